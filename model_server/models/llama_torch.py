"""A Llama decoder in PyTorch with a static KV cache: the model behind the torch runner.

Parameter names and layouts are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`,
rotary in "rotate_half" layout), so a checkpoint with canonical names loads as is. The module
reads only the architecture (`LlamaArchitecture`); building it from a checkpoint, placing it
over devices and quantizing it are the torch backend's (`model_server.backends.torch.weights`,
`.quantize`).

The KV cache is paged: per layer `[num_blocks, block_size, kv_heads, head_dim]`, and a sequence
is its block table (position p in block table[p // block_size] at offset p % block_size). One
entry point uses it: `step` runs the tokens of several sequences in one pass (their projections
and MLPs as one matrix product each): prompt chunks (`Chunk`, a prompt from position 0 or a
later piece of it after the earlier ones) and decode rows (`DecodeRows`, one token for each of
several sequences, each at its own position). `forward` is a cache-free causal pass (a
reference for tests).

Layer i runs on `layer_devices[i]` (pipeline placement over several devices), the embeddings on
`devices[0]`, the final norm and the output projection on `devices[-1]`. A layer's projections
run as their `nn.Linear`s, or through the served forms set on `Attention.qkv`/`.o` and
`MLP.gate_up`/`.down` (any `Weight`: fused float matrices, int8, int4); the output projection
through `head` when it is served in another form (quantized, or by a CPU kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import nn
from torch.nn import functional

from servables.configs.llama import LlamaArchitecture

StepTensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Chunk:
    """Positions [start, start + length) of the sequence with block table `blocks` (the
    positions before `start` are in the cache already)."""

    blocks: tuple[int, ...]
    start: int
    length: int

    @property
    def num_tokens(self) -> int:
        return self.length


@dataclass(frozen=True)
class DecodeRows:
    """One token per row: row b at positions[b] of the sequence with block table tables[b],
    attending to its positions up to its own, all below `span` (a multiple of the block
    size, or the sequence length)."""

    tables: tuple[tuple[int, ...], ...]
    positions: tuple[int, ...]
    span: int
    # Set when row b's blocks are first + b * stride, first + b * stride + 1, ... (one
    # sequence whose blocks follow each other, or several evenly spaced): the cache is then
    # attended in place instead of gathered.
    first: int | None = None
    stride: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tables)


Part = Chunk | DecodeRows


class LinearWeight(Protocol):
    """A linear weight [N, K] served in another form than a float tensor (e.g. int8)."""

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        ...


# A layer's linear weight as served: a float tensor [N, K] or another form.
Weight = torch.Tensor | LinearWeight


def _linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return functional.linear(x, weight)
    return weight.linear(x)


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
        gate, up = _linear(x, self.gate_up).chunk(2, dim=-1)
        return _linear(functional.silu(gate) * up, self.down)


class Attention(nn.Module):
    """Grouped-query attention with RoPE; owns its layer's KV cache."""

    def __init__(self, config: LlamaArchitecture) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        dim, hd = config.model_dim, config.head_dim
        self.q_proj = nn.Linear(dim, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, dim, bias=False)
        self.k_cache: torch.Tensor | None = None  # [blocks, block_size, KV, hd]
        self.v_cache: torch.Tensor | None = None
        # Set after loading: [q; k; v] and o as served (fused float or int8).
        self.qkv: Weight | None = None
        self.o: Weight | None = None

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [q; k; v] [B, T, (H + 2 KV) * hd]."""
        if self.qkv is None:
            return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        return _linear(x, self.qkv)

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
        return self.o_proj(x) if self.o is None else _linear(x, self.o)

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
        t["positions"][n] of its sequence. Writes every token's K/V into the cache first
        (cache row t["kv_rows"]), then each part attends: a chunk to its sequence's positions up
        to each token, decode rows each to their own sequence's. Returns [1, N, D]."""
        assert self.k_cache is not None and self.v_cache is not None
        q, k, v = self._qkv(x, rope)  # [1, H, N, hd], [1, KV, N, hd]
        hd = self.head_dim
        rows = t["kv_rows"]
        self.k_cache.view(-1, hd).index_copy_(0, rows, k[0].transpose(0, 1).reshape(-1, hd))
        self.v_cache.view(-1, hd).index_copy_(0, rows, v[0].transpose(0, 1).reshape(-1, hd))
        gqa = self.num_heads != self.num_kv_heads
        outs: list[torch.Tensor] = []
        offset = 0
        for i, part in enumerate(parts):
            n = part.num_tokens
            qs = q[:, :, offset : offset + n]
            if isinstance(part, Chunk) and part.start == 0:
                out = functional.scaled_dot_product_attention(
                    qs,
                    k[:, :, offset : offset + n],
                    v[:, :, offset : offset + n],
                    is_causal=True,
                    enable_gqa=gqa,
                )  # [1, H, n, hd]
                outs.append(out.transpose(1, 2).reshape(1, n, -1))
            elif isinstance(part, Chunk):
                end = part.start + n
                keys, values = self._gather(t[f"blocks{i}"], 1, end)  # [1, KV, end, hd]
                out = functional.scaled_dot_product_attention(
                    qs, keys, values, attn_mask=t[f"mask{i}"], enable_gqa=gqa
                )
                outs.append(out.transpose(1, 2).reshape(1, n, -1))
            else:
                outs.append(self._attend_rows(qs, part, t.get(f"blocks{i}"), t[f"mask{i}"]))
            offset += n
        return self._o(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))

    def _gather(
        self, blocks: torch.Tensor, rows: int, span: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `rows` sequences, positions [0, span): blocks [rows * per_row]
        (each row's table, padded) -> two [rows, KV, span, hd] views of one gathered copy."""
        assert self.k_cache is not None and self.v_cache is not None
        kv, hd = self.k_cache.shape[2:]
        out = []
        for cache in (self.k_cache, self.v_cache):
            picked = cache.index_select(0, blocks).view(rows, -1, kv, hd)  # [R, P, KV, hd]
            out.append(picked[:, :span].transpose(1, 2))
        return out[0], out[1]

    def _in_place(
        self, rows: int, span: int, first: int, stride: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `rows` sequences whose blocks follow each other from block
        first + b * stride: two [rows, KV, span, hd] views of the cache."""
        assert self.k_cache is not None and self.v_cache is not None
        size, kv, hd = self.k_cache.shape[1:]
        shape, strides = (rows, span, kv, hd), (stride * size * kv * hd, kv * hd, hd, 1)
        offset = first * size * kv * hd
        out = [
            c.as_strided(shape, strides, offset).transpose(1, 2)
            for c in (self.k_cache, self.v_cache)
        ]
        return out[0], out[1]

    def _attend_rows(
        self,
        q: torch.Tensor,
        part: DecodeRows,
        blocks: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Decode rows: q [1, H, B, hd], row b attending to the positions of its sequence
        (blocks: the rows' tables, padded, [B * per_row]; None: attended in place) that `mask`
        [B, 1, 1, A] marks. Returns [1, B, H * hd]."""
        span = mask.shape[-1]
        b = q.shape[2]
        if blocks is None:
            assert part.first is not None
            keys, values = self._in_place(b, span, part.first, part.stride)
        else:
            keys, values = self._gather(blocks, b, span)  # [B, KV, A, hd]
        group = self.num_heads // self.num_kv_heads
        # Query heads of one KV head become its query rows: no K/V repetition.
        q = q[0].transpose(0, 1).reshape(b, self.num_kv_heads, group, self.head_dim)
        attn = functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return attn.reshape(1, b, self.num_heads * self.head_dim)


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


class _PerDevice:
    """Copies of small step tensors on each device the layers use, made once per step."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self._by_device: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._tensors = tensors

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        found = self._by_device.get(device)
        if found is None:
            found = {k: v.to(device, non_blocking=True) for k, v in self._tensors.items()}
            self._by_device[device] = found
        return found


class LlamaForCausalLM(nn.Module):
    """The decoder and its output projection (built from a checkpoint by the torch backend)."""

    def __init__(self, config: LlamaArchitecture) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        # Set when the output projection is served in another form: quantized (int8, int4) by
        # the loader, or through a CPU kernel by the runner.
        self.head: Weight | None = None
        # Where the model runs: embeddings on the first device, final norm and output projection
        # on the last; layer i on layer_devices[i].
        self.devices: list[torch.device] = [torch.device("meta")]
        self.layer_devices: list[torch.device] = [torch.device("meta")] * config.num_layers
        self.num_blocks = 0
        self.block_size = 0
        self._rope: dict[torch.device, torch.Tensor] = {}

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers, typed."""
        return cast(list[DecoderLayer], list(self.model.layers))

    # KV cache.

    def allocate_cache(self, num_blocks: int, block_size: int, max_len: int) -> None:
        """Allocates (zeroed) KV caches of num_blocks blocks of block_size positions and the
        RoPE tables of max_len positions."""
        cfg = self.config
        self.num_blocks, self.block_size = num_blocks, block_size
        dtype = self.lm_head.weight.dtype
        for i, layer in enumerate(self.decoder_layers):
            attn = layer.self_attn
            shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=self.layer_devices[i])
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=self.layer_devices[i])
        self._rope = {
            d: rope_tables(cfg.head_dim, cfg.rope_theta, max_len, d) for d in set(self.devices)
        }

    def free_cache(self) -> None:
        """Drops the KV caches."""
        for layer in self.decoder_layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self._rope = {}

    def copy_block(self, src: int, dst: int, length: int) -> None:
        """Copies K/V positions [0, length) of block src into block dst."""
        for layer in self.decoder_layers:
            attn = layer.self_attn
            assert attn.k_cache is not None and attn.v_cache is not None
            attn.k_cache[dst, :length] = attn.k_cache[src, :length]
            attn.v_cache[dst, :length] = attn.v_cache[src, :length]

    # Steps.

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] (after the norm) -> float32 logits [..., V]."""
        if self.head is not None:
            return _linear(hidden, self.head).float()
        return self.lm_head(hidden).float()

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
        """One pass over several sequences' tokens: tokens [N] (int64), `parts` in order (prompt
        chunks, decode rows). Writes their K/V into the cache and returns the final hidden states
        [N, D] (after the norm, on the last device)."""
        size = self.block_size
        kv = self.config.num_kv_heads
        blocks: list[torch.Tensor] = []  # cache block of each token
        positions: list[torch.Tensor] = []
        tensors: dict[str, torch.Tensor] = {}
        for i, part in enumerate(parts):
            if isinstance(part, Chunk):
                pos = torch.arange(part.start, part.start + part.length)
                table = torch.tensor(part.blocks)
                blocks.append(table[pos // size])
                if part.start:
                    end = part.start + part.length
                    tensors[f"blocks{i}"] = table[: -(-end // size)]
                    mask = torch.arange(end)[None, :] <= pos[:, None]
                    tensors[f"mask{i}"] = mask[None, None]  # [1, 1, n, end]
            else:
                pos = torch.tensor(part.positions)
                per_row = -(-part.span // size)
                padded = [(*t, *(t[-1:] * (per_row - len(t))))[:per_row] for t in part.tables]
                table = torch.tensor(padded)  # [B, per_row]
                blocks.append(table.gather(1, (pos // size)[:, None])[:, 0])
                if part.first is None:
                    tensors[f"blocks{i}"] = table.flatten()
                mask = torch.arange(part.span)[None, :] <= pos[:, None]
                tensors[f"mask{i}"] = mask[:, None, None, :]  # [B, 1, 1, A]
            positions.append(pos)
        pos = torch.cat(positions)
        if pos.shape[0] != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} tokens for parts of {pos.shape[0]}")
        cells = torch.cat(blocks) * size + pos % size  # [N]: cache position of each token
        heads = torch.arange(kv)
        tensors["kv_rows"] = (cells[:, None] * kv + heads[None, :]).flatten()  # [N * KV]
        tensors["positions"] = pos
        per_device = _PerDevice(**tensors)
        x = self.model.embed_tokens(tokens.to(self.devices[0]))[None]  # [1, N, D]
        rope: dict[torch.device, torch.Tensor] = {}
        for i, layer in enumerate(self.decoder_layers):
            device = self.layer_devices[i]
            t = per_device.on(device)
            if device not in rope:
                rope[device] = self._rope[device].index_select(1, t["positions"])[:, None]
            x = layer.step(x.to(device), rope[device], parts, t)  # rope [2, 1, N, hd]
        return self.model.norm(x.to(self.devices[-1]))[0]
