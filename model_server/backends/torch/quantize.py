"""Served forms of the torch Llama's linear weights: fused projections and weight-only int8.

After loading, `fuse` builds each layer's fused projections: Q, K and V into one matrix, the
MLP's gate and up into another (the per-projection parameters become views of them). With
QUANTIZATION=int8 the loader quantizes the layers' linear weights as they stream in
(`to_int8`): int8 values with one scale per output channel (symmetric, amax / 127), multiplied
by `torch.ops.aten._weight_int8pack_mm` on bfloat16 activations for a few rows (decode), or
dequantized on the fly for many (prefill).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from model_server.models.llama_torch import LlamaForCausalLM, Weight

# Rows up to which an int8 weight is multiplied by the int8 kernel; more are dequantized first.
_INT8_KERNEL_MAX_ROWS = 32
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")


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
        return self.values.numel() + self.scales.numel() * self.scales.element_size()


def is_layer_linear(name: str, tensor: torch.Tensor) -> bool:
    """Whether a checkpoint tensor is a layer's linear weight (the ones int8 quantizes)."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") and tensor.dim() == 2


def to_int8(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Int8Weight:
    """The int8 form of a float weight [N, K] on device, its scales rounded to dtype."""
    q = Int8Weight.quantize(tensor.detach().to(device))
    return Int8Weight(q.values, q.scales.to(dtype).float())


def _cat(parts: Sequence[Weight]) -> Weight:
    """Linear weights stacked along their output rows (all float or all int8)."""
    if all(isinstance(p, Int8Weight) for p in parts):
        return Int8Weight.cat(cast(Sequence[Int8Weight], parts))
    return torch.cat(cast(Sequence[torch.Tensor], parts))


def fuse(model: LlamaForCausalLM, quantized: Mapping[str, Int8Weight] | None = None) -> None:
    """Sets each layer's fused projections ([q; k; v], [gate; up]) and o and down from its
    weights, or from `quantized` (canonical name -> int8 weight) for the weights it holds. Float
    per-projection parameters become views of the fused matrices (no second copy)."""
    quantized = quantized or {}

    def served(module: nn.Linear, name: str) -> Weight:
        # A plain tensor (detached), not a Parameter: not registered on the module.
        return quantized.get(name) or module.weight.detach()

    for i, layer in enumerate(model.decoder_layers):
        prefix = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp

        qkv_mods = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}
        parts = [served(m, f"{prefix}self_attn.{n}.weight") for n, m in qkv_mods.items()]
        attn.qkv = _cat(parts)
        attn.o = served(attn.o_proj, f"{prefix}self_attn.o_proj.weight")
        mlp_mods = {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}
        parts = [served(m, f"{prefix}mlp.{n}.weight") for n, m in mlp_mods.items()]
        mlp.gate_up = _cat(parts)
        mlp.down = served(mlp.down_proj, f"{prefix}mlp.down_proj.weight")
        for modules, fused in ((qkv_mods, attn.qkv), (mlp_mods, mlp.gate_up)):
            if isinstance(fused, torch.Tensor):
                start = 0
                for module in modules.values():
                    rows = module.weight.shape[0]
                    view = fused[start : start + rows]
                    module.weight = nn.Parameter(view, requires_grad=False)
                    start += rows
