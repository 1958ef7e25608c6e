"""Memory arithmetic of decoder models (Llama, BLOOM): weight bytes, KV cache, activations,
largest layer.

The one place these figures are computed, from an architecture's tensor shapes and KV cache size
(`servables.servable_config.Architecture`, e.g. `LlamaArchitecture`):
`DecoderConfig.memory_bytes()`, `saxutil estimate` and the admin's placement all use
`estimate_config` / `estimate_memory`.
Import-light (no torch).

Conventions:
- dtype is the compute dtype ("float32", "bfloat16", "float16"); the KV cache is kept in it.
- quantization "int8": a decoder layer's 2-D weights take one byte per value plus a compute-dtype
  scale per output row; "int4": half a byte per value plus a bfloat16 scale and zero per group
  of `group_size` input columns (4 bytes a group). The LM head takes `head_quantization`
  (default: the same); a tied one so quantized is a copy of the embeddings (the float table
  stays for the lookup). Embeddings and norms stay in the compute dtype.
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
from typing import TYPE_CHECKING

from sax.errors import InvalidArgumentError

if TYPE_CHECKING:
    from servables.servable_config import Architecture, ServableConfig

# "auto" is resolved by the backend on the machine (bfloat16 where the hardware computes in
# it, else float32); estimates count it as float32, the widest it can become.
DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}
QUANTIZATIONS = ("none", "int8", "int4")
# Bytes of one int4 group's bfloat16 scale and zero.
_INT4_GROUP_BYTES = 4
_HEAD = "lm_head.weight"
# A decoder layer's tensors (Llama's "model.layers.N.", BLOOM's "transformer.h.N.").
LAYER_RE = re.compile(r"^((?:model\.layers|transformer\.h)\.\d+)\.")
# The token embeddings a tied output projection reuses.
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.word_embeddings.weight")


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
    """The block a tensor belongs to: "model.layers.3" (or "transformer.h.3") for a decoder-layer
    tensor, else the
    tensor's own name without ".weight"."""
    match = LAYER_RE.match(name)
    return match.group(1) if match else name.removesuffix(".weight")


def tensor_bytes(
    name: str,
    shape: Sequence[int],
    dtype: str,
    quantization: str = "none",
    *,
    group_size: int = 32,
    head_quantization: str | None = None,
) -> int:
    """Bytes of one weight tensor as served. A decoder layer's 2-D weights take `quantization`,
    the LM head `head_quantization` (None: the same): int8 one byte per value plus a `dtype`
    scale per output row, int4 half a byte per value plus 4 bytes per group of `group_size`
    input columns; everything else stays in dtype."""
    head = quantization if head_quantization is None else head_quantization
    for q in (quantization, head):
        if q not in QUANTIZATIONS:
            raise InvalidArgumentError(
                f"unknown quantization {q!r}; use one of {', '.join(QUANTIZATIONS)}"
            )
    count, size = math.prod(shape), dtype_bytes(dtype)
    served = head if name == _HEAD else quantization if LAYER_RE.match(name) else "none"
    if served == "none" or len(shape) != 2:
        return count * size
    rows, columns = int(shape[0]), int(shape[1])
    if served == "int8":
        return count + rows * size
    return -(-count // 2) + rows * -(-columns // group_size) * _INT4_GROUP_BYTES


def estimate_memory(
    arch: Architecture,
    *,
    dtype: str,
    quantization: str = "none",
    batch_size: int = 1,
    seq_len: int = 0,
    tensor_shapes: Mapping[str, Sequence[int]] | None = None,
    kv_tokens: int = 0,
    group_size: int = 32,
    head_quantization: str | None = None,
) -> MemoryEstimate:
    """The estimate of a model of this architecture (e.g. a `LlamaArchitecture`) serving
    batch_size sequences of seq_len positions. tensor_shapes (default: `arch.tensor_shapes()`)
    may come from a checkpoint. kv_tokens: positions of a paged KV cache (0: batch_size x
    seq_len). group_size and head_quantization: as `tensor_bytes`; a quantized tied LM head (no
    lm_head.weight among the shapes) counts as a copy of the embeddings."""
    shapes = dict(arch.tensor_shapes() if tensor_shapes is None else tensor_shapes)
    head = quantization if head_quantization is None else head_quantization
    embed = next((shapes[n] for n in EMBEDDINGS if n in shapes), None)
    if head != "none" and _HEAD not in shapes and embed is not None:
        shapes[_HEAD] = embed
    layers: dict[str, int] = {}
    for name, dims in shapes.items():
        key = layer_of(name)
        size = tensor_bytes(
            name, dims, dtype, quantization, group_size=group_size, head_quantization=head
        )
        layers[key] = layers.get(key, 0) + size
    largest = max(layers, key=layers.__getitem__, default="")  # the first of equals
    per_token, size = arch.kv_bytes_per_token(dtype), dtype_bytes(dtype)
    return MemoryEstimate(
        dtype=dtype,
        quantization=quantization,
        largest_layer=largest,
        largest_layer_bytes=layers.get(largest, 0),
        weight_bytes=sum(layers.values()),
        kv_bytes_per_token=per_token,
        batch_size=batch_size,
        seq_len=seq_len,
        kv_cache_bytes=per_token * (kv_tokens or batch_size * seq_len),
        activation_bytes=seq_len * (4 * arch.vocab_size + 3 * arch.hidden_dim * size),
    )


def estimate_config(
    config: ServableConfig,
    *,
    dtype: str | None = None,
    quantization: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> MemoryEstimate:
    """The estimate of a servable config with an architecture (a `DecoderConfig`).

    dtype, quantization, batch_size and seq_len default to the config's dtype, quantization,
    max(batch_sizes) and input_seq_len + max_decode_steps; the LM head takes the config's
    lm_head_quantization when quantization is not "none". With the defaults, weight_bytes,
    kv_bytes_per_token and total_bytes are `DecoderConfig.weight_bytes()`,
    `kv_cache_bytes_per_token()` and `memory_bytes()` (without a `ram` override).
    INVALID_ARGUMENT for a config without an architecture (test mode).
    """
    arch = config.architecture()
    if arch is None:
        raise InvalidArgumentError(
            f"{type(config).__name__} has no architecture (a test-mode config); use a "
            "llama.* or bloom.* config"
        )
    quantization = quantization or config.quantization
    head = getattr(config, "lm_head_quantization", None) if quantization != "none" else "none"
    return estimate_memory(
        arch,
        dtype=dtype or config.dtype,
        quantization=quantization,
        batch_size=max(config.batch_sizes) if batch_size is None else batch_size,
        seq_len=config.input_seq_len + config.max_decode_steps if seq_len is None else seq_len,
        kv_tokens=int(getattr(config, "kv_cache_tokens", 0)) if batch_size is None else 0,
        group_size=int(getattr(config, "quantization_group_size", 32)),
        head_quantization=head,
    )
