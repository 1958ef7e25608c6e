"""A checkpoint's weights on a mesh: the safetensors shards read with numpy, each tensor put in
`llama_jax`'s parameter layout and dtype and placed straight onto its shards.

Safetensors files are memory-mapped (bfloat16 through ml_dtypes). Each tensor is placed with
`jax.make_array_from_callback` (each process only fills its own devices' slices), and a layer's
tensor is written into its stacked array in place (a donated `dynamic_update_slice`), so the
host holds about one tensor at a time.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model_server.backends.jax.jax_mesh import place
from model_server.models import llama_jax
from sax.errors import FailedPreconditionError
from servables.checkpoint import (
    Checkpoint,
    natural_key,
    open_files,
    read_safetensors,
    read_safetensors_header,
)
from servables.configs.llama import LlamaConfig

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


def _safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, read-only array view) of one local safetensors file, memory-mapped."""
    header = read_safetensors(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name in sorted(header.tensors, key=natural_key):
        entry = header.tensors[name]
        dtype = _NP_DTYPES.get(entry.dtype)
        if dtype is None:
            raise FailedPreconditionError(
                f"{path}: tensor {name!r} has dtype {entry.dtype}, which the JAX engine does "
                "not read; convert the checkpoint with --dtype float32 or bfloat16"
            )
        yield name, data[entry.begin : entry.end].view(dtype).reshape(entry.shape)


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
    order = llama_jax.interleave_order(hd)
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


def load_params(
    config: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]], mesh: Mesh, specs: Any
) -> llama_jax.Params:
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
            top[key] = place(value, NamedSharding(mesh, specs[key]))
        else:
            spec = layer_specs[key]
            if key not in layers:
                shape = (config.num_layers, *value.shape)
                zeros = jax.jit(
                    lambda s=shape, t=value.dtype: jnp.zeros(s, t),
                    out_shardings=NamedSharding(mesh, spec),
                )
                layers[key] = zeros()
            part = place(value, NamedSharding(mesh, P(*spec[1:])))
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
