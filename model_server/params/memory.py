"""Memory arithmetic of Llama-style models: tensor shapes, weight bytes, KV cache, largest layer.

The one place these figures are computed: `LlamaConfig.memory_bytes()`, `saxutil estimate` and
the admin's placement all use `estimate_llama` / `estimate_memory`. Import-light (no torch).

Conventions:
- dtype is the compute dtype ("float32", "bfloat16", "float16"); the KV cache is kept in it.
- quantization "int8": a decoder layer's 2-D weights take one byte per value plus a compute-dtype
  scale per output row; embeddings, LM head and norms stay in the compute dtype.
- KV cache per token: 2 (K and V) x layers x KV heads x head dim x dtype size.
- activations: the largest prefill's float32 logits and MLP activations,
  seq_len x (4 x vocab + 3 x hidden_dim x dtype size).
- total = weights + KV cache (batch x seq_len positions) + activations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sax.errors import InvalidArgumentError

DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZATIONS = ("none", "int8")
_LAYER_RE = re.compile(r"^(model\.layers\.\d+)\.")


@dataclass(frozen=True)
class LlamaShape:
    """The architecture numbers that decide a Llama model's memory."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    model_dim: int
    hidden_dim: int
    vocab_size: int
    tie_embeddings: bool
    # Size of one attention head; 0 means model_dim // num_heads.
    head_dim: int = 0

    @property
    def attn_head_dim(self) -> int:
        """The head dimension in use."""
        return self.head_dim or self.model_dim // self.num_heads

    @classmethod
    def from_config(cls, config: Any) -> LlamaShape:
        """From a servable config with Llama fields (num_layers, num_heads, num_kv_heads,
        model_dim, hidden_dim, vocab_size, tie_embeddings; head_dim optional)."""
        names = ("num_layers", "num_heads", "num_kv_heads", "model_dim", "hidden_dim", "vocab_size")
        missing = [n for n in (*names, "tie_embeddings") if not hasattr(config, n)]
        if missing:
            raise InvalidArgumentError(
                f"{type(config).__name__} is not a Llama config (no {', '.join(missing)}); "
                "use a llama.* config"
            )
        return cls(
            **{n: int(getattr(config, n)) for n in names},
            tie_embeddings=bool(config.tie_embeddings),
            head_dim=int(getattr(config, "head_dim", 0) or 0),
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> LlamaShape:
        """From a Hugging Face style config.json (as in a checkpoint's metadata/config.json)."""
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                model_dim=int(config["hidden_size"]),
                hidden_dim=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                head_dim=int(config.get("head_dim") or 0),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgumentError(
                f"config.json lacks a Llama architecture field or has a bad value ({e!r}); it "
                "needs num_hidden_layers, num_attention_heads, hidden_size, intermediate_size "
                "and vocab_size"
            ) from e

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical (Hugging Face Llama) tensor names and shapes, in layer order."""
        d, f, v = self.model_dim, self.hidden_dim, self.vocab_size
        q, kv = self.num_heads * self.attn_head_dim, self.num_kv_heads * self.attn_head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (d,)
            shapes[p + "self_attn.q_proj.weight"] = (q, d)
            shapes[p + "self_attn.k_proj.weight"] = (kv, d)
            shapes[p + "self_attn.v_proj.weight"] = (kv, d)
            shapes[p + "self_attn.o_proj.weight"] = (d, q)
            shapes[p + "post_attention_layernorm.weight"] = (d,)
            shapes[p + "mlp.gate_proj.weight"] = (f, d)
            shapes[p + "mlp.up_proj.weight"] = (f, d)
            shapes[p + "mlp.down_proj.weight"] = (d, f)
        shapes["model.norm.weight"] = (d,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (v, d)
        return shapes

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of one token over every layer, in bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.attn_head_dim * dtype_bytes(dtype)


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one replica in bytes."""

    dtype: str
    quantization: str
    # The largest block loaded at once: one decoder layer, the embedding or the LM head.
    largest_layer: str
    largest_layer_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    batch_size: int
    # Positions per sequence: input_seq_len + max_decode_steps.
    seq_len: int
    # KV cache of batch_size sequences of seq_len positions.
    kv_cache_bytes: int
    # Working memory of the largest prefill (seq_len positions): float32 logits and the MLP
    # activations.
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        """Weights + KV cache + activations: what the replica needs."""
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def fits(self, device_memory: int) -> bool:
        """Whether the replica fits in device_memory bytes."""
        return self.total_bytes <= device_memory


def dtype_bytes(dtype: str) -> int:
    """Bytes per value of a compute dtype; INVALID_ARGUMENT if unknown."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}"
        ) from None


def layer_of(name: str) -> str:
    """The block a tensor belongs to: "model.layers.3" for a decoder-layer tensor, else the
    tensor's own name without ".weight"."""
    match = _LAYER_RE.match(name)
    return match.group(1) if match else name.removesuffix(".weight")


def tensor_bytes(name: str, shape: Sequence[int], dtype: str, quantization: str = "none") -> int:
    """Bytes of one weight tensor as served. With int8, a decoder layer's 2-D weights take one
    byte per value plus a `dtype` scale per output row; everything else stays in dtype."""
    if quantization not in QUANTIZATIONS:
        raise InvalidArgumentError(
            f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}"
        )
    count, size = math.prod(shape), dtype_bytes(dtype)
    if quantization == "int8" and len(shape) == 2 and _LAYER_RE.match(name):
        return count + int(shape[0]) * size
    return count * size


def estimate_memory(
    shape: LlamaShape,
    *,
    dtype: str,
    quantization: str = "none",
    batch_size: int = 1,
    seq_len: int = 0,
    tensor_shapes: Mapping[str, Sequence[int]] | None = None,
) -> MemoryEstimate:
    """The estimate of a model of this architecture serving batch_size sequences of seq_len
    positions. tensor_shapes (default: `shape.tensor_shapes()`) may come from a checkpoint."""
    shapes = shape.tensor_shapes() if tensor_shapes is None else tensor_shapes
    layers: dict[str, int] = {}
    for name, dims in shapes.items():
        key = layer_of(name)
        layers[key] = layers.get(key, 0) + tensor_bytes(name, dims, dtype, quantization)
    largest = max(layers, key=layers.__getitem__, default="")  # the first of equals
    per_token, size = shape.kv_bytes_per_token(dtype), dtype_bytes(dtype)
    return MemoryEstimate(
        dtype=dtype,
        quantization=quantization,
        largest_layer=largest,
        largest_layer_bytes=layers.get(largest, 0),
        weight_bytes=sum(layers.values()),
        kv_bytes_per_token=per_token,
        batch_size=batch_size,
        seq_len=seq_len,
        kv_cache_bytes=per_token * batch_size * seq_len,
        activation_bytes=seq_len * (4 * shape.vocab_size + 3 * shape.hidden_dim * size),
    )


def estimate_llama(
    config: Any,
    *,
    dtype: str | None = None,
    quantization: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> MemoryEstimate:
    """The estimate of a Llama servable config (LlamaConfig or any object with its fields).

    dtype, quantization, batch_size and seq_len default to the config's dtype, quantization,
    max(batch_sizes) and input_seq_len + max_decode_steps. With the defaults, weight_bytes,
    kv_bytes_per_token and total_bytes are `LlamaConfig.weight_bytes()`,
    `kv_cache_bytes_per_token()` and `memory_bytes()` (without a `ram` override).
    """
    if batch_size is None:
        batch_size = max(getattr(config, "batch_sizes", (1,)) or (1,))
    if seq_len is None:
        seq_len = int(getattr(config, "input_seq_len", 0)) + int(
            getattr(config, "max_decode_steps", 0)
        )
    return estimate_memory(
        LlamaShape.from_config(config),
        dtype=dtype or str(getattr(config, "dtype", "float32")),
        quantization=quantization or str(getattr(config, "quantization", "none")),
        batch_size=batch_size,
        seq_len=seq_len,
    )
