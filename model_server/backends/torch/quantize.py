"""Served forms of the torch decoders' linear weights: fused projections, weight-only int8 and int4.

After loading, `fuse` builds each layer's fused projections: Q, K and V into one matrix, the
MLP's gate and up into another (the per-projection parameters become views of them), and sets
the model's quantized output projection (`LlamaForCausalLM.head`) where there is one.

With QUANTIZATION=int8 or int4 the loader quantizes the layers' linear weights as they stream
in, and the output projection as LM_HEAD_QUANTIZATION says (int8 by default, int4 or none;
`Scheme`); with tied embeddings the float table stays for the lookup and the head is a
quantized copy of it.

- int8 (`Int8Weight`): int8 values with one scale per output channel (symmetric, amax / 127),
  multiplied by `torch.ops.aten._weight_int8pack_mm` on bfloat16 activations for a few rows
  (decode), or dequantized on the fly for many (prefill).
- int4 (`Int4Weight`): 4-bit values q in [0, 15] in groups of QUANTIZATION_GROUP_SIZE (32, 64,
  128 or 256) input columns, each group with a bfloat16 scale and zero (asymmetric, min/max):
  w = (q - 8) * scale + zero. On CPUs the values are packed for
  `torch.ops.aten._weight_int4pack_mm_for_cpu`, which multiplies bfloat16 activations (float32
  ones take a path over 10x slower) for any number of rows: on a 2-core AVX-512 BF16 CPU, with
  576x1536, 1536x576 and 49152x576 weights, it was 2x to 190x faster than
  dequantize-then-multiply from 1 to 32 rows and never slower up to 512. A weight whose output
  rows are not a multiple of 16 (the kernel's packing), or that lives on another device, keeps
  two values per byte and is dequantized on the fly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from model_server.models.paged_torch import PagedDecoder, Weight
from sax.errors import InvalidArgumentError
from servables.decoder_config import INT4_GROUP_SIZES
from servables.memory import LAYER_RE

# Rows up to which an int8 weight is multiplied by the int8 kernel; more are dequantized first.
_INT8_KERNEL_MAX_ROWS = 32
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)
# The int4 kernel packs output rows in blocks of 16.
_INT4_ROW_MULTIPLE = 16
# Input rows recovered at once when the kernel's packed values are unpacked (`dequantize`).
_UNPACK_ROWS = 1024


class Int8Weight:
    """A linear weight [N, K] as int8 values and one float32 scale per output row."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values = values  # [N, K] int8
        self.scales = scales  # [N] float32
        self._scales_bf16 = scales.to(torch.bfloat16)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """Symmetric per-output-channel quantization of a float weight [N, K]."""
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
        values = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(values, scales)

    @classmethod
    def cat(cls, parts: Sequence[Int8Weight]) -> Int8Weight:
        """The weights stacked along the output rows."""
        return cls(torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [N, K] in dtype."""
        return self.values.to(dtype) * self.scales.to(dtype)[:, None]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        if _HAS_INT8_KERNEL and x.device.type == "cpu" and rows.shape[0] <= _INT8_KERNEL_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(
                rows.to(torch.bfloat16), self.values, self._scales_bf16
            ).to(x.dtype)
        else:
            out = functional.linear(rows, self.dequantize(x.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def nbytes(self) -> int:
        """Bytes of the values and scales."""
        return self.values.numel() + self.scales.numel() * self.scales.element_size()


class Int4Weight:
    """A linear weight [N, K] as 4-bit values in groups of `group_size` input columns, each
    group with a bfloat16 scale and zero: w = (q - 8) * scale + zero, q in [0, 15].

    values: [N, K / 2] uint8 in one of two layouts. Plain (`kernel_packed` False): byte j of row
    n holds q[n, 2j] in its low half and q[n, 2j + 1] in its high half; any device. Packed for
    the CPU kernel (`packed()`): `_convert_weight_to_int4pack_for_cpu`'s layout.
    scales_and_zeros: [K / group_size, N, 2] bfloat16 (the kernel's layout)."""

    def __init__(
        self,
        values: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        group_size: int,
        *,
        kernel_packed: bool = False,
    ) -> None:
        self.values = values
        self.scales_and_zeros = scales_and_zeros
        self.group_size = group_size
        self.kernel_packed = kernel_packed
        groups, n, _ = scales_and_zeros.shape
        self.shape = (n, groups * group_size)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
        """Group-wise asymmetric quantization of a float weight [N, K] (plain layout).
        INVALID_ARGUMENT for a group size the kernel does not take or that does not divide K."""
        n, k = weight.shape
        check_group_size(group_size, k)
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, K / G]
        scales = ((hi - lo) / 15.0).clamp(min=1e-6).to(torch.bfloat16)
        zeros = (lo + 8.0 * scales.float()).to(torch.bfloat16)
        # Rounded against the stored (bfloat16) scale and zero: what the kernel computes with.
        q = (w - zeros.float()[..., None]) / scales.float()[..., None] + 8.0
        q = torch.round(q).clamp(0, 15).to(torch.uint8).reshape(n, k)
        scales_and_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).contiguous()
        return cls(_pack_plain(q), scales_and_zeros, group_size)

    @classmethod
    def cat(cls, parts: Sequence[Int4Weight]) -> Int4Weight:
        """The weights stacked along the output rows (plain layout), all of one group size."""
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise InvalidArgumentError(f"int4 weights of group sizes {sorted(sizes)} do not stack")
        values = torch.cat([_pack_plain(p.unpacked_values()) for p in parts])
        return cls(values, torch.cat([p.scales_and_zeros for p in parts], dim=1), sizes.pop())

    def packed(self) -> Int4Weight:
        """This weight packed for the CPU kernel, or itself where the kernel does not apply
        (not on a CPU, the kernel missing, or output rows not a multiple of 16)."""
        n = self.shape[0]
        fits = self.values.device.type == "cpu" and n % _INT4_ROW_MULTIPLE == 0
        if self.kernel_packed or not fits or not _HAS_INT4_KERNEL:
            return self
        q = self.unpacked_values().to(torch.int32)
        # innerKTiles is ignored by the CPU packing; 2 is the value the CUDA one also takes.
        values = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        return Int4Weight(values, self.scales_and_zeros, self.group_size, kernel_packed=True)

    def unpacked_values(self) -> torch.Tensor:
        """q [N, K] uint8 in [0, 15]."""
        n, k = self.shape
        if not self.kernel_packed:
            return torch.stack((self.values & 15, self.values >> 4), dim=-1).reshape(n, k)
        # Layout-free: the kernel with scale 1 and zero 8 turns rows of the identity into
        # rows of q (small integers, exact in bfloat16).
        unit = torch.ones_like(self.scales_and_zeros)
        unit[..., 1] = 8
        out = torch.empty(k, n, dtype=torch.uint8, device=self.values.device)
        for start in range(0, k, _UNPACK_ROWS):
            m = min(_UNPACK_ROWS, k - start)
            eye = torch.zeros(m, k, dtype=torch.bfloat16, device=self.values.device)
            eye[:, start : start + m] = torch.eye(m, dtype=torch.bfloat16)
            rows = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.values, self.group_size, unit
            )
            out[start : start + m] = rows.round().to(torch.uint8)
        return out.t().contiguous()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [N, K] in dtype (as the kernel computes it, in float32)."""
        n, k = self.shape
        q = self.unpacked_values().reshape(n, k // self.group_size, self.group_size).float()
        scales, zeros = self.scales_and_zeros.float().unbind(-1)  # [K / G, N]
        w = (q - 8.0) * scales.t()[..., None] + zeros.t()[..., None]
        return w.reshape(n, k).to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        if self.kernel_packed and x.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16).contiguous(),
                self.values,
                self.group_size,
                self.scales_and_zeros,
            ).to(x.dtype)
        else:
            out = functional.linear(rows, self.dequantize(x.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def nbytes(self) -> int:
        """Bytes of the values, scales and zeros."""
        sz = self.scales_and_zeros
        return self.values.numel() + sz.numel() * sz.element_size()


def _pack_plain(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (values in [0, 15]) -> [N, K / 2] uint8, two values a byte (low half first)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def check_group_size(group_size: int, columns: int) -> None:
    """INVALID_ARGUMENT unless group_size is one the int4 kernel takes and divides columns."""
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidArgumentError(
            f"QUANTIZATION_GROUP_SIZE must be one of {list(INT4_GROUP_SIZES)}, got {group_size}"
        )
    if columns % group_size:
        raise InvalidArgumentError(
            f"QUANTIZATION_GROUP_SIZE {group_size} does not divide a weight's {columns} input "
            "columns; choose a group size that divides the model's widths"
        )


QuantizedWeight = Int8Weight | Int4Weight


HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Scheme:
    """What the loader quantizes and how: the layers' linear weights in `layers`, the output
    projection in `head` ("int8", "int4" or "none": left in the model's dtype); int4 in groups
    of `group_size` input columns."""

    layers: str
    head: str = "int8"
    group_size: int = 32

    def kind(self, name: str, tensor: torch.Tensor) -> str:
        """How a checkpoint tensor is served: "int8", "int4" or "none"."""
        if name == HEAD:
            return self.head
        return self.layers if is_layer_linear(name, tensor) else "none"

    def quantize(
        self, kind: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> QuantizedWeight:
        """The `kind` form of a float weight [N, K] on device (int8 scales rounded to dtype;
        int4 scales and zeros are bfloat16, the kernel's)."""
        if kind == "int8":
            return to_int8(tensor, device, dtype)
        if kind == "int4":
            return Int4Weight.quantize(tensor.detach().to(device), self.group_size)
        raise InvalidArgumentError(f"unknown quantization {kind!r}; use int8 or int4")


def is_layer_linear(name: str, tensor: torch.Tensor) -> bool:
    """Whether a checkpoint tensor is a layer's linear weight (the ones quantization covers)."""
    return bool(LAYER_RE.match(name)) and name.endswith(".weight") and tensor.dim() == 2


def to_int8(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Int8Weight:
    """The int8 form of a float weight [N, K] on device, its scales rounded to dtype."""
    q = Int8Weight.quantize(tensor.detach().to(device))
    return Int8Weight(q.values, q.scales.to(dtype).float())


def _served(weight: Weight) -> Weight:
    """The form a weight is multiplied in (int4: packed for the kernel where it applies)."""
    return weight.packed() if isinstance(weight, Int4Weight) else weight


def _cat(parts: Sequence[Weight]) -> Weight:
    """Linear weights stacked along their output rows (all float, all int8 or all int4)."""
    if all(isinstance(p, Int8Weight) for p in parts):
        return Int8Weight.cat(cast(Sequence[Int8Weight], parts))
    if all(isinstance(p, Int4Weight) for p in parts):
        return Int4Weight.cat(cast(Sequence[Int4Weight], parts)).packed()
    return torch.cat(cast(Sequence[torch.Tensor], parts))


def fuse(model: PagedDecoder, quantized: Mapping[str, QuantizedWeight] | None = None) -> None:
    """Sets each layer's served projections (`PagedDecoder.projections`: Llama's [q; k; v] and
    [gate; up] fused, o and down; BLOOM's as they are) from its weights, or from `quantized`
    (canonical name -> quantized weight) for the weights it holds, and the model's `head` from
    quantized["lm_head.weight"] when there is one. Float weights that are fused become views of
    the fused matrix (no second copy)."""
    quantized = quantized or {}

    def served(module: nn.Linear, name: str) -> Weight:
        # A plain tensor (detached), not a Parameter: not registered on the module.
        return quantized.get(name) or module.weight.detach()

    for owner, attr, modules in model.projections():
        parts = [served(m, name) for m, name in modules]
        fused = _cat(parts) if len(parts) > 1 else _served(parts[0])
        setattr(owner, attr, fused)
        if len(parts) > 1 and isinstance(fused, torch.Tensor):
            start = 0
            for module, _ in modules:
                rows = module.weight.shape[0]
                view = fused[start : start + rows]
                module.weight = nn.Parameter(view, requires_grad=False)
                start += rows
    head = quantized.get(HEAD)
    if head is not None:
        model.head = _served(head)
