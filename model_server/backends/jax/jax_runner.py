"""The JAX runner: the engine's `Runner` over `model_server.models.llama_jax`, with its
weights (`jax_weights`) and KV cache split over the config's mesh (`jax_mesh`). Logits come
back to the host as numpy and are sampled there (`model_server.backends.logits_runner`).

Step functions are compiled at load time: prefill once per bucket (plus the all-positions
logits used by scoring), decode once per batch size (attending over the whole slot with a mask),
and the slot copy; `jax_mesh.configure` points JAX's persistent compilation cache at a folder
so a reload or a restarted server skips compilation.

With several processes (`model_server.backends.jax.multihost`) process 0 owns the runner that
the engine calls; each call is first sent to the other processes, which make the same call on
their own runner, since every process must run every step of a multi-process mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model_server.backends.jax import multihost
from model_server.backends.jax.jax_mesh import build_mesh, mesh_shape, place
from model_server.backends.jax.jax_weights import iter_numpy_tensors, load_params
from model_server.backends.logits_runner import LogitsRunner, RunnerChecks, smallest_at_least
from model_server.models import llama_jax as jax_llama
from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables.checkpoint import Checkpoint
from servables.configs.llama import LlamaConfig

logger = logging.getLogger(__name__)


class JaxRunner(RunnerChecks, LogitsRunner):
    """The engine's `Runner` over `jax_llama` on a mesh. Calls are serialized by a lock."""

    def __init__(
        self,
        config: LlamaConfig,
        params: jax_llama.Params,
        mesh: Mesh,
        layout: jax_llama.Layout,
        num_slots: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.mesh = mesh
        self.layout = layout
        self._set_shapes(config, num_slots)
        self._scratch = num_slots  # the extra slot that padding rows and warm-up write to
        self._lock = threading.Lock()
        self._leader: multihost.Leader | None = None
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
        self._rope = (place(cos, repl), place(sin, repl))
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

    def attach(self, leader: multihost.Leader, runner_id: int) -> None:
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

    def prefill_logits(
        self, slot: int, tokens: Sequence[int], *, all_logits: bool = True, start: int = 0
    ) -> np.ndarray:
        padded = self._check_prefill(slot, tokens, start)
        ids = [int(t) for t in tokens]
        message = {"op": "prefill", "slot": slot, "tokens": ids, "all_logits": all_logits}
        return self._run(message, lambda: self._prefill_local(slot, ids, padded, all_logits))

    def _prefill_local(
        self, slot: int, tokens: list[int], padded: int, all_logits: bool
    ) -> np.ndarray:
        n = len(tokens)
        ids = np.zeros(padded, np.int32)
        ids[:n] = tokens
        self._cache, hidden = self._prefill(
            self._params, self._cache, self._rope, ids, np.int32(slot)
        )
        if all_logits:
            return _to_host(self._all_logits(self._params, hidden), n)
        return _to_host(self._last_logits(self._params, hidden, np.int32(n - 1)))

    def decode_logits(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> np.ndarray:
        self._check_decode(slots, tokens, positions)
        s, t, p = ([int(v) for v in seq] for seq in (slots, tokens, positions))
        message = {"op": "decode", "slots": s, "tokens": t, "positions": p}
        return self._run(message, lambda: self._decode_local(s, t, p))

    def _decode_local(
        self, slots: list[int], tokens: list[int], positions: list[int]
    ) -> np.ndarray:
        largest = self.batch_sizes[-1]
        parts = []
        for i in range(0, len(slots), largest):
            chunk = slice(i, i + largest)
            parts.append(self._decode_batch(slots[chunk], tokens[chunk], positions[chunk]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _decode_batch(
        self, slots: list[int], tokens: list[int], positions: list[int]
    ) -> np.ndarray:
        n = len(slots)
        size = smallest_at_least(self.batch_sizes, n)
        assert size is not None
        pad = size - n
        ids = np.array([*tokens, *([0] * pad)], np.int32)
        rows = np.array([*slots, *([self._scratch] * pad)], np.int32)
        pos = np.array([*positions, *([0] * pad)], np.int32)
        self._cache, out = self._decode(self._params, self._cache, self._rope, ids, rows, pos)
        return _to_host(out, n)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if not self._check_copy(src, dst, length):
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


def _to_host(logits: jax.Array, rows: int | None = None) -> np.ndarray:
    """The first `rows` rows of replicated float32 logits as a numpy array (sliced on the
    host: slicing a multi-process array would be a step of its own)."""
    host = np.asarray(logits, dtype=np.float32)
    return host[:rows] if rows is not None else host


def build_jax_runner(
    config: LlamaConfig, ckpt: Checkpoint, num_slots: int | None = None
) -> JaxRunner:
    """Builds the runner: mesh, weights streamed onto their shards, KV cache of `num_slots`
    slots (default: the largest batch size), then the warm-up compilation."""
    config.validate()
    if not isinstance(config, LlamaConfig):
        raise FailedPreconditionError(
            f"the JAX engine serves Llama configs, not {type(config).__name__}; serve it with "
            "the torch backend (--backend torch)"
        )
    if config.dtype == "auto":  # TPUs compute in bfloat16; XLA's CPU kernels in float32
        dtype = "bfloat16" if jax.devices()[0].platform == "tpu" else "float32"
        logger.info("DTYPE auto: %s on %s", dtype, jax.devices()[0].platform)
        config = dataclasses.replace(config, dtype=dtype)
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
    leader = multihost.current_leader()
    if leader is None:
        return build_jax_runner(config, ckpt, num_slots)
    runner_id = next(_ids)
    runner = leader.load(
        runner_id, config, ckpt.path, num_slots, lambda: build_jax_runner(config, ckpt, num_slots)
    )
    runner.attach(leader, runner_id)
    return runner
