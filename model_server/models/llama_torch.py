"""A Llama decoder in PyTorch with a static KV cache: the model behind the torch runner.

Parameter names and layouts are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`,
rotary in "rotate_half" layout), so a checkpoint with canonical names loads as is. The module
reads only the architecture (`LlamaArchitecture`); building it from a checkpoint, placing it
over devices and quantizing it are the torch backend's (`model_server.backends.torch.weights`,
`.quantize`).

The KV cache, the step's parts (`Chunk`, `DecodeRows`) and attention over the cache are
shared with the other families (`model_server.models.paged_torch`); `step` runs prompt chunks
and decode rows of several sequences in one pass. `forward` is a cache-free causal pass (a
reference for tests).

Layer i runs on `layer_devices[i]` (pipeline placement over several devices), the embeddings on
`devices[0]`, the final norm and the output projection on `devices[-1]`. A layer's projections
run as their `nn.Linear`s, or through the served forms set on `Attention.qkv`/`.o` and
`MLP.gate_up`/`.down` (any `Weight`: fused float matrices, int8, int4); the output projection
through `head` when it is served in another form (quantized, or by a CPU kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from model_server.models.paged_torch import (
    PagedDecoder,
    PagedKV,
    Part,
    PerDevice,
    Projection,
    StepTensors,
    Weight,
    linear,
    linears,
    step_tensors,
)
from servables.configs.llama import LlamaArchitecture


def rope_tables(head_dim: int, theta: float, length: int, device: torch.device) -> torch.Tensor:
    """cos and sin of every position, stacked: [2, length, head_dim] float32 (HF's layout)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [hd/2]
    positions = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)  # [L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
    return torch.stack((emb.cos(), emb.sin()))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., hd] rotated by cos/sin broadcastable to x (float32 tables, cast to x's dtype)."""
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op
            return functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

        # Set after loading: [gate; up] and down as served (fused float or int8).
        self.gate_up: Weight | None = None
        self.down: Weight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None or self.down is None:
            return self.down_proj(functional.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return linear(functional.silu(gate) * up, self.down)


class Attention(PagedKV):
    """Grouped-query attention with RoPE; owns its layer's KV cache."""

    def __init__(self, config: LlamaArchitecture) -> None:
        super().__init__(config.num_heads, config.num_kv_heads, config.head_dim)
        dim, hd = config.model_dim, config.head_dim
        self.q_proj = nn.Linear(dim, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, dim, bias=False)
        # Set after loading: [q; k; v] and o as served (fused float or int8).
        self.qkv: Weight | None = None
        self.o: Weight | None = None

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [q; k; v] [B, T, (H + 2 KV) * hd]."""
        if self.qkv is None:
            return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        return linear(x, self.qkv)

    def _qkv(
        self, x: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D], rope [2, B or 1, T, hd] -> q [B, H, T, hd], k and v [B, KV, T, hd]."""
        b, t, _ = x.shape
        h, kv = self.num_heads, self.num_kv_heads
        qkv = self._project(x).view(b, t, h + 2 * kv, self.head_dim)
        cos, sin = rope[0].unsqueeze(2), rope[1].unsqueeze(2)  # [B or 1, T, 1, hd]
        qk = _apply_rope(qkv[:, :, : h + kv], cos, sin)  # q and k heads rotated at once
        q = qk[:, :, :h].transpose(1, 2)
        k = qk[:, :, h:].transpose(1, 2)
        return q, k, qkv[:, :, h + kv :].transpose(1, 2)

    def _o(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(x) if self.o is None else linear(x, self.o)

    def _out(self, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape  # [B, H, T, hd]
        return self._o(attn.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Cache-free causal attention: x [B, T, D] -> [B, T, D]."""
        q, k, v = self._qkv(x, rope)
        gqa = self.num_heads != self.num_kv_heads
        return self._out(
            functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        )

    def step(
        self, x: torch.Tensor, rope: torch.Tensor, parts: Sequence[Part], t: StepTensors
    ) -> torch.Tensor:
        """x [1, N, D]: the step's tokens, `parts` in order, token n at position
        t["positions"][n] of its sequence (`PagedKV.attend`). Returns [1, N, D]."""
        q, k, v = self._qkv(x, rope)  # [1, H, N, hd], [1, KV, N, hd]
        return self._o(self.attend(q, k, v, parts, t))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: LlamaArchitecture) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.model_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.model_dim, config.norm_eps)
        self.mlp = MLP(config.model_dim, config.hidden_dim)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return self._mlp(x + self.self_attn(self.input_layernorm(x), rope))

    def step(
        self, x: torch.Tensor, rope: torch.Tensor, parts: Sequence[Part], t: StepTensors
    ) -> torch.Tensor:
        return self._mlp(x + self.self_attn.step(self.input_layernorm(x), rope, parts, t))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: LlamaArchitecture) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.model_dim, config.norm_eps)


class LlamaForCausalLM(PagedDecoder):
    """The decoder and its output projection (built from a checkpoint by the torch backend)."""

    LAYER_PREFIX = "model.layers."
    FIRST_DEVICE_PREFIXES = ("model.embed_tokens.",)

    def __init__(self, config: LlamaArchitecture) -> None:
        super().__init__(config)
        self.config: LlamaArchitecture = config
        self.model = LlamaModel(config)
        self._rope: dict[torch.device, torch.Tensor] = {}

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers, typed."""
        return cast(list[DecoderLayer], list(self.model.layers))

    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def kv_layers(self) -> list[PagedKV]:
        return [layer.self_attn for layer in self.decoder_layers]

    def projections(self) -> list[Projection]:
        out: list[Projection] = []
        for i, layer in enumerate(self.decoder_layers):
            p = f"{self.LAYER_PREFIX}{i}."
            attn, mlp = layer.self_attn, layer.mlp
            out += [
                (attn, "qkv", linears(attn, p + "self_attn.", "q_proj", "k_proj", "v_proj")),
                (attn, "o", linears(attn, p + "self_attn.", "o_proj")),
                (mlp, "gate_up", linears(mlp, p + "mlp.", "gate_proj", "up_proj")),
                (mlp, "down", linears(mlp, p + "mlp.", "down_proj")),
            ]
        return out

    # KV cache.

    def allocate_cache(self, num_blocks: int, block_size: int, max_len: int) -> None:
        """Allocates (zeroed) KV caches of num_blocks blocks of block_size positions and the
        RoPE tables of max_len positions."""
        super().allocate_cache(num_blocks, block_size, max_len)
        cfg = self.config
        self._rope = {
            d: rope_tables(cfg.head_dim, cfg.rope_theta, max_len, d) for d in set(self.devices)
        }

    def free_cache(self) -> None:
        """Drops the KV caches."""
        super().free_cache()
        self._rope = {}

    # Steps.

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cache-free causal pass: tokens [B, T] -> float32 logits [B, T, V]."""
        t = tokens.shape[1]
        x = self.model.embed_tokens(tokens.to(self.devices[0]))  # [B, T, D]
        rope: dict[torch.device, torch.Tensor] = {}
        for i, layer in enumerate(self.decoder_layers):
            device = self.layer_devices[i]
            if device not in rope:
                table = rope_tables(self.config.head_dim, self.config.rope_theta, t, device)
                rope[device] = table.unsqueeze(1)  # [2, 1, T, hd]
            x = layer(x.to(device), rope[device])
        return self.logits(self.model.norm(x.to(self.devices[-1])))

    def step(self, tokens: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        tensors = step_tensors(parts, self.block_size, self.config.num_kv_heads, tokens.shape[0])
        per_device = PerDevice(tensors)
        x = self.model.embed_tokens(tokens.to(self.devices[0]))[None]  # [1, N, D]
        rope: dict[torch.device, torch.Tensor] = {}
        for i, layer in enumerate(self.decoder_layers):
            device = self.layer_devices[i]
            t = per_device.on(device)
            if device not in rope:
                rope[device] = self._rope[device].index_select(1, t["positions"])[:, None]
            x = layer.step(x.to(device), rope[device], parts, t)  # rope [2, 1, N, hd]
        return self.model.norm(x.to(self.devices[-1]))[0]
