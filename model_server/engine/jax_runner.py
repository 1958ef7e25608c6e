"""The JAX runner: a `Runner` (see `model_server.engine.runner`) over `models.jax_llama`, with
its weights and KV cache split over a `jax.sharding.Mesh` of ICI_MESH_SHAPE.

The mesh takes the first prod(ICI_MESH_SHAPE) devices (of every process with `jax.distributed`)
in the shape [replica, data, model] (`jax_llama.MESH_AXES`; a shorter shape gets leading 1s).
`jax_llama.Layout` decides per config which dimensions split over "data" and "model".

Loading streams the checkpoint tensor by tensor with numpy (safetensors files are memory-mapped,
also bfloat16 through ml_dtypes): each tensor is put in the model's layout and dtype and placed
straight onto its shards (`jax.make_array_from_callback`; each process only places its own
devices' slices), and a layer's tensor is written into its stacked array in place (a donated
`dynamic_update_slice`), so the host holds about one tensor at a time.

Step functions are compiled at load time: prefill once per bucket (plus the all-positions
logits used by scoring), decode once per batch size (attending over the whole slot with a mask),
and the slot copy. `configure` points JAX's persistent compilation cache at a folder so a
reload or a restarted server skips compilation.

With several processes (`model_server.multihost`) process 0 owns the runner that the engine
calls; each call is first sent to the other processes, which make the same call on their own
runner, since every process must run every step of a multi-process mesh.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model_server.checkpoint import Checkpoint, natural_key, open_files, read_safetensors_header
from model_server.engine.runner import RunnerChecks, smallest_at_least
from model_server.models import jax_llama
from model_server.params.llama import LlamaConfig
from sax.errors import FailedPreconditionError, InvalidArgumentError

if TYPE_CHECKING:
    from model_server.multihost import Leader

logger = logging.getLogger(__name__)

_NP_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
}
_NP_TARGET = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_PARAMS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_TOP_PARAMS = {
    "model.embed_tokens.weight": "embed",
    "lm_head.weight": "lm_head",
    "model.norm.weight": "final_norm",
}


def configure(cache_dir: str = "") -> None:
    """Sets JAX's persistent compilation cache folder (every compiled step is kept)."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def mesh_shape(config: LlamaConfig) -> tuple[int, int, int]:
    """ICI_MESH_SHAPE as [replica, data, model]; INVALID_ARGUMENT past three axes."""
    shape = tuple(config.ici_mesh_shape)
    if len(shape) > len(jax_llama.MESH_AXES):
        raise InvalidArgumentError(
            f"ICI_MESH_SHAPE {list(shape)} has more than 3 axes ({', '.join(jax_llama.MESH_AXES)})"
        )
    full = (1,) * (3 - len(shape)) + shape
    return full[0], full[1], full[2]


def build_mesh(config: LlamaConfig) -> Mesh:
    """The config's mesh over the first prod(ICI_MESH_SHAPE) devices (of all processes);
    FAILED_PRECONDITION when there are fewer."""
    shape = mesh_shape(config)
    n = int(np.prod(shape))
    devices = jax.devices()
    if len(devices) < n:
        raise FailedPreconditionError(
            f"the config's ICI_MESH_SHAPE {list(config.ici_mesh_shape)} needs {n} devices, this "
            f"server has {len(devices)} ({devices[0].platform}); publish with a smaller "
            "ICI_MESH_SHAPE or start the server on a larger slice"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices[:n])
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices[:n]).reshape(shape)
    return Mesh(grid, jax_llama.MESH_AXES)


# ---------------------------------------------------------------------------- checkpoint


def _safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, read-only array view) of one local safetensors file, memory-mapped."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + size
    for name in sorted((n for n in header if n != "__metadata__"), key=natural_key):
        entry = header[name]
        dtype = _NP_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise FailedPreconditionError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}, which the JAX engine does "
                "not read; convert the checkpoint with --dtype float32 or bfloat16"
            )
        start, end = entry["data_offsets"]
        yield name, data[base + start : base + end].view(dtype).reshape(entry["shape"])


def iter_numpy_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, np.ndarray]]:
    """(canonical name, array) of every tensor, one shard at a time (a gs:// shard is copied to
    a temp file first); an array is valid until the next one is asked for."""
    files = open_files(ckpt.path)
    expected: dict[str, set[str]] = {}
    for name, shard in ckpt.weight_map.items():
        expected.setdefault(shard, set()).add(name)
    for shard in sorted(expected):
        rel = f"state/{shard}"
        read_safetensors_header(files, rel)  # a clear error for a damaged header
        with files.local_copy(rel) as local:
            seen = set()
            for name, array in _safetensors(local):
                if name in expected[shard]:
                    seen.add(name)
                    yield name, array
            missing = sorted(expected[shard] - seen)
            if missing:
                raise FailedPreconditionError(
                    f"{files.url}/{rel} has no tensor {missing[0]!r} although the index lists "
                    "it there; the checkpoint is damaged, convert it again"
                )


def _to_layout(config: LlamaConfig, key: str, w: np.ndarray) -> np.ndarray:
    """A checkpoint tensor (Hugging Face layout) in the JAX parameter layout of `key`."""
    h, kv, hd, d = config.num_heads, config.num_kv_heads, config.head_dim, config.model_dim
    order = jax_llama.interleave_order(hd)
    if key == "wq":
        return w.reshape(h, hd, d)[:, order].transpose(2, 0, 1)
    if key == "wk":
        return w.reshape(kv, hd, d)[:, order].transpose(2, 0, 1)
    if key == "wv":
        return w.reshape(kv, hd, d).transpose(2, 0, 1)
    if key == "wo":
        return w.T.reshape(h, hd, d)
    if key in ("w_gate", "w_up", "w_down"):
        return w.T
    return w


def _hf_shape(config: LlamaConfig, key: str) -> tuple[int, ...]:
    h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    d, f, v = config.model_dim, config.hidden_dim, config.vocab_size
    return {
        "embed": (v, d),
        "lm_head": (v, d),
        "final_norm": (d,),
        "attn_norm": (d,),
        "mlp_norm": (d,),
        "wq": (h * hd, d),
        "wk": (kv * hd, d),
        "wv": (kv * hd, d),
        "wo": (d, h * hd),
        "w_gate": (f, d),
        "w_up": (f, d),
        "w_down": (d, f),
    }[key]


def _place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Puts a host array onto its shards (each process fills only its own devices)."""
    return jax.make_array_from_callback(
        array.shape, sharding, lambda index: np.ascontiguousarray(array[index])
    )


def load_params(
    config: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]], mesh: Mesh, specs: Any
) -> jax_llama.Params:
    """The parameter tree from (canonical name, host array) pairs, each placed on its shards as
    it arrives. FAILED_PRECONDITION for an unknown, missing or misshapen tensor."""
    dtype = _NP_TARGET[config.dtype]
    layer_specs = specs["layers"]
    top: dict[str, jax.Array] = {}
    layers: dict[str, jax.Array] = {}
    loaded: set[str] = set()
    tied = config.tie_embeddings

    @functools.cache
    def setter(key: str) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
        sharding = NamedSharding(mesh, layer_specs[key])
        fn = lambda stacked, x, i: lax.dynamic_update_index_in_dim(stacked, x, i, 0)  # noqa: E731
        return jax.jit(fn, donate_argnums=0, out_shardings=sharding)

    for name, raw in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        match = _LAYER_RE.match(name)
        key = _TOP_PARAMS.get(name)
        index = -1
        if match and match.group(2) in _LAYER_PARAMS and int(match.group(1)) < config.num_layers:
            index, key = int(match.group(1)), _LAYER_PARAMS[match.group(2)]
        if key is None:
            raise FailedPreconditionError(
                f"the checkpoint has a tensor {name!r} that a Llama of this config does not; "
                "check that the config name matches the checkpoint"
            )
        if tuple(raw.shape) != _hf_shape(config, key):
            raise FailedPreconditionError(
                f"checkpoint tensor {name!r} has shape {list(raw.shape)}, the config expects "
                f"{list(_hf_shape(config, key))}; check that the config name matches the checkpoint"
            )
        value = np.ascontiguousarray(_to_layout(config, key, raw).astype(dtype))
        if index < 0:
            top[key] = _place(value, NamedSharding(mesh, specs[key]))
        else:
            spec = layer_specs[key]
            if key not in layers:
                shape = (config.num_layers, *value.shape)
                zeros = jax.jit(
                    lambda s=shape, t=value.dtype: jnp.zeros(s, t),
                    out_shardings=NamedSharding(mesh, spec),
                )
                layers[key] = zeros()
            part = _place(value, NamedSharding(mesh, P(*spec[1:])))
            layers[key] = setter(key)(layers[key], part, np.int32(index))
        loaded.add(name)
        del value
    expected = [n for n in _TOP_PARAMS if not (tied and n == "lm_head.weight")]
    expected += [
        f"model.layers.{i}.{suffix}" for i in range(config.num_layers) for suffix in _LAYER_PARAMS
    ]
    missing = [n for n in expected if n not in loaded]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise FailedPreconditionError(
            f"the checkpoint lacks {len(missing)} tensors of the model: {shown}; check that the "
            "config name matches the checkpoint"
        )
    if tied:
        top["lm_head"] = top["embed"]
    return {**top, "layers": layers}


# ---------------------------------------------------------------------------- runner


class JaxRunner(RunnerChecks):
    """A `Runner` over `jax_llama` on a mesh. Calls are serialized by a lock."""

    def __init__(
        self,
        config: LlamaConfig,
        params: jax_llama.Params,
        mesh: Mesh,
        layout: jax_llama.Layout,
        num_slots: int,
    ) -> None:
        self.config = config
        self.mesh = mesh
        self.layout = layout
        self.num_slots = num_slots
        self.max_seq_len = config.slot_len
        self.vocab_size = config.vocab_size
        self.batch_sizes = tuple(sorted(set(config.batch_sizes)))
        keys = config.bucket_keys or (config.input_seq_len,)
        self.buckets = tuple(sorted({k for k in keys if k < self.max_seq_len} | {self.max_seq_len}))
        self._scratch = num_slots  # the extra slot that padding rows and warm-up write to
        self._lock = threading.Lock()
        self._leader: Leader | None = None
        self._id = 0
        self._params: jax_llama.Params | None = params
        specs = layout.specs()
        cache_sh = NamedSharding(mesh, specs["cache"])
        repl = NamedSharding(mesh, P())
        shape = (
            config.num_layers,
            num_slots + 1,
            config.num_kv_heads,
            self.max_seq_len,
            config.head_dim,
        )
        dtype = jax_llama.JAX_DTYPES[config.dtype]
        zeros = jax.jit(
            lambda: (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
            out_shardings=(cache_sh, cache_sh),
        )
        self._cache: jax_llama.Cache | None = zeros()
        cos, sin = jax_llama.rope_tables(config, self.max_seq_len)
        self._rope = (_place(cos, repl), _place(sin, repl))
        self._prefill = jax.jit(
            functools.partial(jax_llama.prefill, config),
            donate_argnums=1,
            out_shardings=((cache_sh, cache_sh), repl),
        )
        self._decode = jax.jit(
            functools.partial(jax_llama.decode, config),
            donate_argnums=1,
            out_shardings=((cache_sh, cache_sh), repl),
        )
        self._last_logits = jax.jit(
            lambda p, h, i: jax_llama.logits(p, lax.dynamic_slice_in_dim(h, i, 1)),
            out_shardings=repl,
        )
        self._all_logits = jax.jit(jax_llama.logits, out_shardings=repl)
        self._copy = jax.jit(
            jax_llama.copy_slot, donate_argnums=0, out_shardings=(cache_sh, cache_sh)
        )

    # Multi-process.

    def attach(self, leader: Leader, runner_id: int) -> None:
        """Sends every later call to the other processes first (process 0 only)."""
        self._leader, self._id = leader, runner_id

    def _run(self, message: dict[str, Any], local: Callable[[], Any]) -> Any:
        with self._lock:
            if self._params is None or self._cache is None:
                raise FailedPreconditionError("the runner was closed; load the model again")
            if self._leader is None:
                return local()
            return self._leader.step({**message, "id": self._id}, local)

    # Runner protocol.

    def prefill(self, slot: int, tokens: Sequence[int], *, all_logits: bool = True) -> torch.Tensor:
        n = len(tokens)
        if n == 0:
            raise InvalidArgumentError("prefill needs at least one token")
        self._check_slot(slot)
        self._check_tokens(tokens)
        padded = self.bucket(n)
        ids = [int(t) for t in tokens]
        message = {"op": "prefill", "slot": slot, "tokens": ids, "all_logits": all_logits}
        return self._run(message, lambda: self._prefill_local(slot, ids, padded, all_logits))

    def _prefill_local(
        self, slot: int, tokens: list[int], padded: int, all_logits: bool
    ) -> torch.Tensor:
        n = len(tokens)
        ids = np.zeros(padded, np.int32)
        ids[:n] = tokens
        self._cache, hidden = self._prefill(
            self._params, self._cache, self._rope, ids, np.int32(slot)
        )
        if all_logits:
            return _to_torch(self._all_logits(self._params, hidden), n)
        return _to_torch(self._last_logits(self._params, hidden, np.int32(n - 1)))

    def decode(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor:
        n = len(slots)
        if n == 0 or len(tokens) != n or len(positions) != n:
            raise InvalidArgumentError(
                f"decode needs as many tokens and positions as slots, got {n}, {len(tokens)}, "
                f"{len(positions)}"
            )
        if len(set(slots)) != n:
            raise InvalidArgumentError(f"decode slots must be distinct, got {list(slots)}")
        for slot in slots:
            self._check_slot(slot)
        self._check_tokens(tokens)
        bad = [p for p in positions if not 0 <= p < self.max_seq_len]
        if bad:
            raise InvalidArgumentError(
                f"decode positions {bad[:5]} are outside a slot's [0, {self.max_seq_len})"
            )
        s, t, p = ([int(v) for v in seq] for seq in (slots, tokens, positions))
        message = {"op": "decode", "slots": s, "tokens": t, "positions": p}
        return self._run(message, lambda: self._decode_local(s, t, p))

    def _decode_local(
        self, slots: list[int], tokens: list[int], positions: list[int]
    ) -> torch.Tensor:
        largest = self.batch_sizes[-1]
        parts = []
        for i in range(0, len(slots), largest):
            chunk = slice(i, i + largest)
            parts.append(self._decode_batch(slots[chunk], tokens[chunk], positions[chunk]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode_batch(
        self, slots: list[int], tokens: list[int], positions: list[int]
    ) -> torch.Tensor:
        n = len(slots)
        size = smallest_at_least(self.batch_sizes, n)
        assert size is not None
        pad = size - n
        ids = np.array([*tokens, *([0] * pad)], np.int32)
        rows = np.array([*slots, *([self._scratch] * pad)], np.int32)
        pos = np.array([*positions, *([0] * pad)], np.int32)
        self._cache, out = self._decode(self._params, self._cache, self._rope, ids, rows, pos)
        return _to_torch(out, n)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self._check_slot(src)
        self._check_slot(dst)
        if not 0 <= length <= self.max_seq_len:
            raise InvalidArgumentError(f"copy length {length} is outside [0, {self.max_seq_len}]")
        if src == dst or length == 0:
            return
        message = {"op": "copy_slot", "src": src, "dst": dst, "length": length}
        self._run(message, lambda: self._copy_local(src, dst, length))

    def _copy_local(self, src: int, dst: int, length: int) -> None:
        self._cache = self._copy(self._cache, np.int32(src), np.int32(dst), np.int32(length))

    def close(self) -> None:
        with self._lock:
            if self._params is None:
                return
            if self._leader is not None:
                self._leader.step({"op": "close", "id": self._id}, self._free)
            else:
                self._free()
        logger.info("runner closed")

    def _free(self) -> None:
        params, cache = self._params, self._cache
        self._params = self._cache = None
        for array in [*jax.tree.leaves(params), *jax.tree.leaves(cache)]:
            if isinstance(array, jax.Array) and not array.is_deleted():
                array.delete()

    def warm_up(self) -> float:
        """Compiles (or fetches from the persistent cache) and runs every step shape once,
        writing only the scratch slot; returns the seconds taken."""
        started = time.monotonic()
        scratch = np.int32(self._scratch)
        for bucket in self.buckets:
            ids = np.zeros(bucket, np.int32)
            self._cache, hidden = self._prefill(self._params, self._cache, self._rope, ids, scratch)
            self._last_logits(self._params, hidden, np.int32(0)).block_until_ready()
            self._all_logits(self._params, hidden).block_until_ready()
        for size in self.batch_sizes:
            zeros = np.zeros(size, np.int32)
            rows = np.full(size, self._scratch, np.int32)
            self._cache, out = self._decode(
                self._params, self._cache, self._rope, zeros, rows, zeros
            )
            out.block_until_ready()
        self._cache = self._copy(self._cache, scratch, scratch, np.int32(0))
        jax.block_until_ready(self._cache)
        return time.monotonic() - started


def _to_torch(logits: jax.Array, rows: int | None = None) -> torch.Tensor:
    """The first `rows` rows of replicated float32 logits as a (writable) CPU torch tensor
    (sliced on the host: slicing a multi-process array would be a step of its own)."""
    host = np.asarray(logits, dtype=np.float32)
    return torch.from_numpy(np.array(host[:rows] if rows is not None else host))


def build_jax_runner(
    config: LlamaConfig, ckpt: Checkpoint, num_slots: int | None = None
) -> JaxRunner:
    """Builds the runner: mesh, weights streamed onto their shards, KV cache of `num_slots`
    slots (default: the largest batch size), then the warm-up compilation."""
    config.validate()
    if config.quantization != "none":
        raise FailedPreconditionError(
            f"the JAX engine serves unquantized weights only, not {config.quantization!r}; "
            'publish with QUANTIZATION="none"'
        )
    slots = num_slots if num_slots is not None else max(config.batch_sizes)
    if slots <= 0:
        raise InvalidArgumentError(f"num_slots must be positive, got {slots}")
    started = time.monotonic()
    mesh = build_mesh(config)
    _, data, model = mesh_shape(config)
    layout = jax_llama.Layout(config, data, model)
    params = load_params(config, iter_numpy_tensors(ckpt), mesh, layout.specs())
    loaded = time.monotonic() - started
    runner = JaxRunner(config, params, mesh, layout, slots)
    compiled = runner.warm_up()
    logger.info(
        "JAX runner ready: mesh %s, layout %s, %d slots x %d positions, batch sizes %s, "
        "buckets %s; weights in %.2f s, warm-up in %.2f s",
        dict(mesh.shape),
        layout.describe(),
        slots,
        runner.max_seq_len,
        list(runner.batch_sizes),
        list(runner.buckets),
        loaded,
        compiled,
    )
    return runner


_ids = itertools.count(1)


def load_runner(config: LlamaConfig, ckpt: Checkpoint, num_slots: int | None = None) -> JaxRunner:
    """`build_jax_runner`, on every process of a multi-process server (process 0 tells the
    others to build the same runner, and hands them every later call)."""
    from model_server import multihost

    leader = multihost.current_leader()
    if leader is None:
        return build_jax_runner(config, ckpt, num_slots)
    runner_id = next(_ids)
    runner = leader.load(
        runner_id, config, ckpt.path, num_slots, lambda: build_jax_runner(config, ckpt, num_slots)
    )
    runner.attach(leader, runner_id)
    return runner
