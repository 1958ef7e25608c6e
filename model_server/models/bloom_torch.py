"""A BLOOM decoder in PyTorch over the shared paged KV cache: the torch runner's BLOOM model.

Parameter names and layouts are transformers' (`transformer.h.{i}.self_attention.
query_key_value.weight`, its rows [q, k, v] of head 0, then of head 1, ...), so a checkpoint
with canonical names loads as is. The module reads only the architecture (`BloomArchitecture`);
building, placing and quantizing it are the torch backend's, as for every family.

Positions enter only through ALiBi: head h adds slope_h x (key position) to its attention
scores (softmax does not see a shift per query row, so this is BLOOM's -slope_h x distance).
A step turns the shared step tensors' boolean masks into float masks that carry the bias
(`bias{i}`, built once per step, on each device), which every layer's attention adds
(`PagedKV.attend`). The slopes are each head's own (`alibi_slopes`), so a shard of the heads
gets its heads' slopes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from model_server.models.paged_torch import (
    Chunk,
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
from servables.configs.bloom import BloomArchitecture, alibi_slopes


def _project(x: torch.Tensor, module: nn.Linear, served: Weight | None) -> torch.Tensor:
    """x times a linear module's weight (or its served form) plus the module's bias."""
    if served is None:
        return module(x)
    return linear(x, served) + module.bias


class BloomAttention(PagedKV):
    """Multi-head attention with ALiBi, one fused projection for q, k and v (per-head
    interleaved) and biases; owns its layer's KV cache."""

    def __init__(self, config: BloomArchitecture) -> None:
        super().__init__(config.num_heads, config.num_heads, config.head_dim)
        dim = config.model_dim
        self.query_key_value = nn.Linear(dim, 3 * dim)
        self.dense = nn.Linear(dim, dim)
        # Set after loading: query_key_value's and dense's weights as served.
        self.qkv: Weight | None = None
        self.o: Weight | None = None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q, k, v [B, H, T, hd]."""
        b, t, _ = x.shape
        fused = _project(x, self.query_key_value, self.qkv).view(
            b, t, self.num_heads, 3, self.head_dim
        )
        return (
            fused[..., 0, :].transpose(1, 2),
            fused[..., 1, :].transpose(1, 2),
            fused[..., 2, :].transpose(1, 2),
        )

    def _out(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, T, H * hd] -> [B, T, D]."""
        return _project(attn, self.dense, self.o)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Cache-free attention: x [B, T, D], bias [1, H, T, T] (ALiBi and the causal mask)."""
        q, k, v = self._qkv(x)
        out = functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        b, _, t, _ = out.shape
        return self._out(out.transpose(1, 2).reshape(b, t, -1))

    def step(self, x: torch.Tensor, parts: Sequence[Part], t: StepTensors) -> torch.Tensor:
        """x [1, N, D]: the step's tokens (`PagedKV.attend`, with the ALiBi masks in t)."""
        q, k, v = self._qkv(x)
        return self._out(self.attend(q, k, v, parts, t))


class BloomMLP(nn.Module):
    """dense_4h_to_h(gelu_tanh(dense_h_to_4h(x))), with biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(dim, hidden)
        self.dense_4h_to_h = nn.Linear(hidden, dim)
        # Set after loading: the two weights as served.
        self.up: Weight | None = None
        self.down: Weight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = functional.gelu(_project(x, self.dense_h_to_4h, self.up), approximate="tanh")
        return _project(h, self.dense_4h_to_h, self.down)


class BloomBlock(nn.Module):
    """LayerNorm, attention, residual; LayerNorm, MLP, residual (the residual is the block's
    input, or its LayerNorm with residual_post_norm)."""

    def __init__(self, config: BloomArchitecture) -> None:
        super().__init__()
        dim = config.model_dim
        self.input_layernorm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = BloomMLP(dim, config.hidden_dim)
        self.residual_post_norm = config.residual_post_norm

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.post_attention_layernorm(x)
        return self.mlp(h) + (h if self.residual_post_norm else x)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        return self._mlp(self.self_attention(h, bias) + (h if self.residual_post_norm else x))

    def step(self, x: torch.Tensor, parts: Sequence[Part], t: StepTensors) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.self_attention.step(h, parts, t)
        return self._mlp(attn + (h if self.residual_post_norm else x))


class BloomModel(nn.Module):
    """Embeddings and their LayerNorm, the blocks and the final LayerNorm (transformers'
    `transformer.` prefix)."""

    def __init__(self, config: BloomArchitecture) -> None:
        super().__init__()
        dim = config.model_dim
        self.word_embeddings = nn.Embedding(config.vocab_size, dim)
        self.word_embeddings_layernorm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(dim, eps=config.norm_eps)


def _alibi(slopes: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A float mask [X, H, q, A] from a boolean one [X, 1, q, A]: slope_h x key position where
    allowed, -inf elsewhere."""
    keys = torch.arange(allowed.shape[-1], dtype=torch.float32)
    bias = slopes[:, None, None] * keys  # [H, 1, A]
    return torch.where(allowed, bias, float("-inf"))


def _causal(n: int) -> torch.Tensor:
    """[1, 1, n, n]: query i may attend to keys 0..i."""
    return (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None, None]


class BloomForCausalLM(PagedDecoder):
    """The BLOOM decoder and its output projection, tied to the word embeddings."""

    LAYER_PREFIX = "transformer.h."
    FIRST_DEVICE_PREFIXES = ("transformer.word_embeddings",)

    def __init__(self, config: BloomArchitecture) -> None:
        super().__init__(config)
        self.config: BloomArchitecture = config
        self.transformer = BloomModel(config)
        # On the host (the step's masks are built there), also when the model is built on "meta".
        self._slopes = torch.tensor(
            alibi_slopes(config.num_heads), dtype=torch.float32, device="cpu"
        )

    @property
    def decoder_layers(self) -> list[BloomBlock]:
        """The blocks, typed."""
        return cast(list[BloomBlock], list(self.transformer.h))

    def embedding(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def kv_layers(self) -> list[PagedKV]:
        return [block.self_attention for block in self.decoder_layers]

    def projections(self) -> list[Projection]:
        out: list[Projection] = []
        for i, block in enumerate(self.decoder_layers):
            p = f"{self.LAYER_PREFIX}{i}."
            attn, mlp = block.self_attention, block.mlp
            out += [
                (attn, "qkv", linears(attn, p + "self_attention.", "query_key_value")),
                (attn, "o", linears(attn, p + "self_attention.", "dense")),
                (mlp, "up", linears(mlp, p + "mlp.", "dense_h_to_4h")),
                (mlp, "down", linears(mlp, p + "mlp.", "dense_4h_to_h")),
            ]
        return out

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.transformer.word_embeddings(tokens.to(self.devices[0]))
        return self.transformer.word_embeddings_layernorm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cache-free causal pass: tokens [B, T] -> float32 logits [B, T, V]."""
        x = self._embed(tokens)
        bias = _alibi(self._slopes, _causal(tokens.shape[1]))  # [1, H, T, T]
        for i, block in enumerate(self.decoder_layers):
            device = self.layer_devices[i]
            x = block(x.to(device), bias.to(device))
        return self.logits(self.transformer.ln_f(x.to(self.devices[-1])))

    def step(self, tokens: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        tensors = step_tensors(parts, self.block_size, self.config.num_heads, tokens.shape[0])
        dtype = self.lm_head.weight.dtype
        for i, part in enumerate(parts):
            allowed = tensors.pop(f"mask{i}", None)
            if allowed is None:
                assert isinstance(part, Chunk)
                allowed = _causal(part.length)
            tensors[f"bias{i}"] = _alibi(self._slopes, allowed).to(dtype)
        per_device = PerDevice(tensors)
        x = self._embed(tokens)[None]  # [1, N, D]
        for i, block in enumerate(self.decoder_layers):
            device = self.layer_devices[i]
            x = block.step(x.to(device), parts, per_device.on(device))
        return self.transformer.ln_f(x.to(self.devices[-1]))[0]
