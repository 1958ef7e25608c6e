"""What every torch decoder family shares: the step's parts, the paged KV cache and attention over
it, served linear weights, and the base of the families' models (`PagedDecoder`).

The KV cache is paged: per layer `[num_blocks, block_size, kv_heads, head_dim]`, and a sequence
is its block table (position p in block table[p // block_size] at offset p % block_size). A
step runs the tokens of several sequences in one pass: prompt chunks (`Chunk`, a prompt from
position 0 or a later piece of it after the earlier ones) and decode rows (`DecodeRows`, one
token for each of several sequences, each at its own position). `step_tensors` builds the
step's index tensors once; each layer's attention writes its keys and values into the cache
(`write_kv`) and attends (`attend`), with a causal mask or, where the family adds a position
bias (BLOOM's ALiBi), the float masks it puts in the step's tensors (`bias{i}`).

Layer i runs on `layer_devices[i]` (pipeline placement over several devices), the embeddings on
`devices[0]`, the final norm and the output projection on `devices[-1]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional

from servables.servable_config import Architecture

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
# A served projection: (owner, attribute) that holds it as a `Weight`, and the linear modules
# (with their weights' canonical names) whose weights it stacks along the output rows.
Projection = tuple[object, str, list[tuple[nn.Linear, str]]]


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """x [..., K] times a served weight [N, K] -> [..., N]."""
    if isinstance(weight, torch.Tensor):
        return functional.linear(x, weight)
    return weight.linear(x)


def linears(owner: nn.Module, prefix: str, *names: str) -> list[tuple[nn.Linear, str]]:
    """The named linear submodules of owner with their weights' canonical names
    (prefix + name + ".weight"), for a `Projection`."""
    return [(getattr(owner, n), f"{prefix}{n}.weight") for n in names]


def step_tensors(
    parts: Sequence[Part], block_size: int, kv_heads: int, num_tokens: int
) -> StepTensors:
    """The index tensors of a step (on the host): "positions" [N] (each token's position in its
    sequence), "kv_rows" [N * KV] (its cache rows), and per part i "blocks{i}" (the tables to
    gather; absent for chunks from position 0 and decode rows attended in place) and "mask{i}"
    (bool, True where a token may attend: [1, 1, n, end] for a later chunk, [B, 1, 1, span]
    for decode rows; absent for chunks from position 0, which are causal)."""
    size = block_size
    blocks: list[torch.Tensor] = []  # cache block of each token
    positions: list[torch.Tensor] = []
    tensors: StepTensors = {}
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
    if pos.shape[0] != num_tokens:
        raise ValueError(f"{num_tokens} tokens for parts of {pos.shape[0]}")
    cells = torch.cat(blocks) * size + pos % size  # [N]: cache position of each token
    heads = torch.arange(kv_heads)
    tensors["kv_rows"] = (cells[:, None] * kv_heads + heads[None, :]).flatten()  # [N * KV]
    tensors["positions"] = pos
    return tensors


class PerDevice:
    """Copies of small step tensors on each device the layers use, made once per step."""

    def __init__(self, tensors: StepTensors) -> None:
        self._by_device: dict[torch.device, StepTensors] = {}
        self._tensors = tensors

    def on(self, device: torch.device) -> StepTensors:
        found = self._by_device.get(device)
        if found is None:
            found = {k: v.to(device, non_blocking=True) for k, v in self._tensors.items()}
            self._by_device[device] = found
        return found


class PagedKV(nn.Module):
    """The KV cache of one attention layer, and attention over it."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.k_cache: torch.Tensor | None = None  # [blocks, block_size, KV, hd]
        self.v_cache: torch.Tensor | None = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        parts: Sequence[Part],
        t: StepTensors,
    ) -> torch.Tensor:
        """q [1, H, N, hd], k and v [1, KV, N, hd]: the step's tokens, `parts` in order.
        Writes every token's K/V into the cache first (cache row t["kv_rows"]), then each part
        attends: a chunk to its sequence's positions up to each token, decode rows each to
        their own sequence's, masked by t["bias{i}"] where the step has one (a float mask
        that adds a position bias), else causally. Returns [1, N, H * hd]."""
        assert self.k_cache is not None and self.v_cache is not None
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
            bias = t.get(f"bias{i}")
            if isinstance(part, Chunk) and part.start == 0:
                out = functional.scaled_dot_product_attention(
                    qs,
                    k[:, :, offset : offset + n],
                    v[:, :, offset : offset + n],
                    attn_mask=bias,
                    is_causal=bias is None,
                    enable_gqa=gqa,
                )  # [1, H, n, hd]
                outs.append(out.transpose(1, 2).reshape(1, n, -1))
            elif isinstance(part, Chunk):
                end = part.start + n
                keys, values = self._gather(t[f"blocks{i}"], 1, end)  # [1, KV, end, hd]
                mask = t[f"mask{i}"] if bias is None else bias
                out = functional.scaled_dot_product_attention(
                    qs, keys, values, attn_mask=mask, enable_gqa=gqa
                )
                outs.append(out.transpose(1, 2).reshape(1, n, -1))
            else:
                mask = t[f"mask{i}"] if bias is None else bias
                outs.append(self._attend_rows(qs, part, t.get(f"blocks{i}"), mask))
            offset += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

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
        [B, 1, 1, A] (bool) or [B, H, 1, A] (float, with multi-head attention) allows.
        Returns [1, B, H * hd]."""
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


class PagedDecoder(nn.Module):
    """The base of a family's model: where it runs, its paged KV cache (one `PagedKV` per
    layer, `kv_layers`) and its output projection. A family sets `LAYER_PREFIX` and
    `FIRST_DEVICE_PREFIXES` (the canonical names of its layers and of what runs before them)
    and implements `embedding`, `kv_layers`, `projections`, `forward` and `step`."""

    # Canonical name prefix of decoder layer i: f"{LAYER_PREFIX}{i}.".
    LAYER_PREFIX = ""
    # Canonical names of the tensors that live on the first device (the embeddings).
    FIRST_DEVICE_PREFIXES: tuple[str, ...] = ()

    def __init__(self, config: Architecture) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        # Set when the output projection is served in another form: quantized (int8, int4) by
        # the loader, or through a CPU kernel by the runner.
        self.head: Weight | None = None
        self.devices: list[torch.device] = [torch.device("meta")]
        self.layer_devices: list[torch.device] = [torch.device("meta")] * config.num_layers
        self.num_blocks = 0
        self.block_size = 0

    def embedding(self) -> nn.Embedding:
        """The token embeddings (a tied output projection reuses them)."""
        raise NotImplementedError

    def kv_layers(self) -> list[PagedKV]:
        """Each layer's KV cache holder, in layer order."""
        raise NotImplementedError

    def projections(self) -> list[Projection]:
        """Every layer's served projections: where each is set after loading (fused, quantized)
        and the linear modules it is made of."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cache-free causal pass (a reference for tests): tokens [B, T] -> float32 logits
        [B, T, V]."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        """One pass over several sequences' tokens: tokens [N] (int64), `parts` in order (prompt
        chunks, decode rows). Writes their K/V into the cache and returns the final hidden
        states [N, D] (after the norm, on the last device)."""
        raise NotImplementedError

    def param_device(self, name: str) -> torch.device:
        """Device of the parameter with this canonical name."""
        if name.startswith(self.LAYER_PREFIX):
            return self.layer_devices[int(name[len(self.LAYER_PREFIX) :].split(".")[0])]
        if name.startswith(self.FIRST_DEVICE_PREFIXES):
            return self.devices[0]
        return self.devices[-1]

    def allocate_cache(self, num_blocks: int, block_size: int, max_len: int) -> None:
        """Allocates (zeroed) KV caches of num_blocks blocks of block_size positions; max_len is
        the longest sequence (for position tables)."""
        cfg = self.config
        self.num_blocks, self.block_size = num_blocks, block_size
        dtype = self.lm_head.weight.dtype
        for i, layer in enumerate(self.kv_layers()):
            shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=self.layer_devices[i])
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=self.layer_devices[i])

    def free_cache(self) -> None:
        """Drops the KV caches."""
        for layer in self.kv_layers():
            layer.k_cache = layer.v_cache = None

    def copy_block(self, src: int, dst: int, length: int) -> None:
        """Copies K/V positions [0, length) of block src into block dst."""
        for layer in self.kv_layers():
            assert layer.k_cache is not None and layer.v_cache is not None
            layer.k_cache[dst, :length] = layer.k_cache[src, :length]
            layer.v_cache[dst, :length] = layer.v_cache[src, :length]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] (after the norm) -> float32 logits [..., V]."""
        if self.head is not None:
            return linear(hidden, self.head).float()
        return self.lm_head(hidden).float()
