"""A Llama decoder in PyTorch with a static KV cache: the model behind the engine's runner.

Parameter names and layouts are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`,
rotary in "rotate_half" layout), so a checkpoint with canonical names loads as is. The module is
built on the "meta" device and each weight is placed on its device as it streams in
(`load_weights`), so the host never holds a second full copy of the model.

The KV cache has `num_slots` slots of `slot_len` positions per layer, `[slots, kv_heads,
slot_len, head_dim]`. Two entry points use it: `prefill` runs one sequence into one slot
(causal), `decode` runs one token for each of several slots, each at its own position and
attending to its own slot's positions up to it. `forward` is a cache-free causal pass (a
reference for tests). Shapes depend only on (batch, prompt bucket, attended-length bucket), so
the step functions can be compiled later.

With several devices (a multi-GPU mesh) the layers are split into contiguous groups, one per
device (pipeline placement); the embeddings live on the first, the final norm and the output
projection on the last.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn import functional

from model_server.params.llama import LlamaConfig
from sax.errors import FailedPreconditionError

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint tensors that are not parameters here (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query attention with RoPE; owns its layer's KV cache."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        dim, hd = config.model_dim, config.head_dim
        self.q_proj = nn.Linear(dim, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, dim, bias=False)
        self.k_cache: torch.Tensor | None = None  # [S, KV, L, hd]
        self.v_cache: torch.Tensor | None = None

    def _qkv(
        self, x: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D], rope [2, B or 1, T, hd] -> q [B, H, T, hd], k and v [B, KV, T, hd]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # [B or 1, 1, T, hd]
        return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

    def _out(self, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape  # [B, H, T, hd]
        return self.o_proj(attn.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Cache-free causal attention: x [B, T, D] -> [B, T, D]."""
        q, k, v = self._qkv(x, rope)
        gqa = self.num_heads != self.num_kv_heads
        return self._out(
            functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        )

    def prefill(self, x: torch.Tensor, rope: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """x [1, T, D] at positions [0, T); writes K/V into the slot (a [1] index tensor)."""
        assert self.k_cache is not None and self.v_cache is not None
        q, k, v = self._qkv(x, rope)
        t = x.shape[1]
        self.k_cache[slot, :, :t] = k
        self.v_cache[slot, :, :t] = v
        gqa = self.num_heads != self.num_kv_heads
        return self._out(
            functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        )

    def decode(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, 1, D], token i at positions[i] of slots[i]; mask [B, 1, 1, A] marks the
        attended positions [0, A) of each slot. Writes the new K/V, returns [B, 1, D]."""
        assert self.k_cache is not None and self.v_cache is not None
        q, k, v = self._qkv(x, rope)  # [B, H, 1, hd], [B, KV, 1, hd]
        self.k_cache[slots, :, positions] = k[:, :, 0]
        self.v_cache[slots, :, positions] = v[:, :, 0]
        span = mask.shape[-1]
        keys = self.k_cache[:, :, :span].index_select(0, slots)  # [B, KV, A, hd]
        values = self.v_cache[:, :, :span].index_select(0, slots)
        b = x.shape[0]
        group = self.num_heads // self.num_kv_heads
        # Query heads of one KV head become its query rows: no K/V repetition.
        q = q.view(b, self.num_kv_heads, group, self.head_dim)
        attn = functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask
        )  # [B, KV, G, hd]
        return self.o_proj(attn.reshape(b, 1, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.model_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.model_dim, config.norm_eps)
        self.mlp = MLP(config.model_dim, config.hidden_dim)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return self._mlp(x + self.self_attn(self.input_layernorm(x), rope))

    def prefill(self, x: torch.Tensor, rope: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        return self._mlp(x + self.self_attn.prefill(self.input_layernorm(x), rope, slot))

    def decode(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        h = self.self_attn.decode(self.input_layernorm(x), rope, slots, positions, mask)
        return self._mlp(x + h)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig) -> None:
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
    """The decoder and its output projection. Build it with `build_model`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        self.devices: list[torch.device] = [torch.device("meta")]
        self.num_slots = 0
        self.slot_len = 0
        self._rope: dict[torch.device, torch.Tensor] = {}

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers, typed."""
        return cast(list[DecoderLayer], list(self.model.layers))

    # Placement.

    def layer_device(self, index: int) -> torch.device:
        """Device of layer `index`: contiguous groups of layers, one group per device."""
        return self.devices[index * len(self.devices) // self.config.num_layers]

    def param_device(self, name: str) -> torch.device:
        """Device of the parameter with this canonical name."""
        if name.startswith("model.layers."):
            return self.layer_device(int(name.split(".")[2]))
        if name.startswith("model.embed_tokens."):
            return self.devices[0]
        return self.devices[-1]

    # KV cache.

    def allocate_cache(self, num_slots: int, slot_len: int) -> None:
        """Allocates (zeroed) KV caches of num_slots x slot_len positions and the RoPE tables."""
        cfg = self.config
        self.num_slots, self.slot_len = num_slots, slot_len
        dtype = self.lm_head.weight.dtype
        for i, layer in enumerate(self.decoder_layers):
            attn = layer.self_attn
            shape = (num_slots, cfg.num_kv_heads, slot_len, cfg.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=self.layer_device(i))
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=self.layer_device(i))
        self._rope = {
            d: rope_tables(cfg.head_dim, cfg.rope_theta, slot_len, d) for d in set(self.devices)
        }

    def free_cache(self) -> None:
        """Drops the KV caches."""
        for layer in self.decoder_layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self._rope = {}

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copies K/V positions [0, length) of slot src into slot dst."""
        for layer in self.decoder_layers:
            attn = layer.self_attn
            assert attn.k_cache is not None and attn.v_cache is not None
            attn.k_cache[dst, :, :length] = attn.k_cache[src, :, :length]
            attn.v_cache[dst, :, :length] = attn.v_cache[src, :, :length]

    # Steps.

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., D] (after the norm) -> float32 logits [..., V]."""
        return self.lm_head(hidden).float()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cache-free causal pass: tokens [B, T] -> float32 logits [B, T, V]."""
        t = tokens.shape[1]
        x = self.model.embed_tokens(tokens.to(self.devices[0]))  # [B, T, D]
        rope: dict[torch.device, torch.Tensor] = {}
        for i, layer in enumerate(self.decoder_layers):
            device = self.layer_device(i)
            if device not in rope:
                table = rope_tables(self.config.head_dim, self.config.rope_theta, t, device)
                rope[device] = table.unsqueeze(1)  # [2, 1, T, hd]
            x = layer(x.to(device), rope[device])
        return self.logits(self.model.norm(x.to(self.devices[-1])))

    def prefill(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens [T] at positions [0, T) into slot -> final hidden states [T, D] (last device).

        K/V of all T positions are written; positions past the real prompt (padding) are
        overwritten by decode before anything attends to them.
        """
        t = tokens.shape[0]
        x = self.model.embed_tokens(tokens.to(self.devices[0]))[None]  # [1, T, D]
        per_device = _PerDevice(slot=torch.tensor([slot]))
        for i, layer in enumerate(self.decoder_layers):
            device = self.layer_device(i)
            rope = self._rope[device][:, None, :t]  # [2, 1, T, hd]
            x = layer.prefill(x.to(device), rope, per_device.on(device)["slot"])
        return self.model.norm(x.to(self.devices[-1]))[0]

    def decode(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, span: int
    ) -> torch.Tensor:
        """One token per row: tokens, slots, positions [B] (int64); each row attends to its
        slot's positions <= its own, all of them < span. -> final hidden states [B, D]."""
        x = self.model.embed_tokens(tokens.to(self.devices[0]))[:, None]  # [B, 1, D]
        mask = torch.arange(span, device=positions.device)[None, :] <= positions[:, None]
        per_device = _PerDevice(slots=slots, positions=positions, mask=mask[:, None, None, :])
        rope: dict[torch.device, torch.Tensor] = {}
        for i, layer in enumerate(self.decoder_layers):
            device = self.layer_device(i)
            step = per_device.on(device)
            if device not in rope:
                table = self._rope[device].index_select(1, step["positions"])  # [2, B, hd]
                rope[device] = table[:, :, None]  # [2, B, 1, hd]
            x = layer.decode(
                x.to(device), rope[device], step["slots"], step["positions"], step["mask"]
            )
        return self.model.norm(x.to(self.devices[-1]))[:, 0]


def _check_config(config: LlamaConfig) -> None:
    if config.quantization != "none":
        raise FailedPreconditionError(
            f"the torch engine serves unquantized weights only, not {config.quantization!r}; "
            'publish with QUANTIZATION="none"'
        )


def build_model(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    devices: Sequence[torch.device | str] = ("cpu",),
) -> LlamaForCausalLM:
    """The model with the checkpoint's weights, in `config.dtype`, placed on `devices` (layers
    split between them); no KV cache yet (`allocate_cache`).

    tensors: (canonical name, tensor) pairs, e.g. `Checkpoint.iter_tensors()` or a HF state
    dict's items. FAILED_PRECONDITION for an unknown, missing or misshapen tensor.
    """
    _check_config(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.devices = [torch.device(d) for d in devices]
    load_weights(model, tensors, TORCH_DTYPES[config.dtype])
    model.eval()
    return model


def load_weights(
    model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> None:
    """Places each tensor on its device in dtype as it arrives, replacing the meta parameters."""
    tied = model.config.tie_embeddings
    params = dict(model.named_parameters())
    if tied:
        params.pop("lm_head.weight")
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        param = params.get(name)
        if param is None:
            raise FailedPreconditionError(
                f"the checkpoint has a tensor {name!r} that a Llama of this config does not; "
                "check that the config name matches the checkpoint"
            )
        if tuple(tensor.shape) != tuple(param.shape):
            raise FailedPreconditionError(
                f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, the config expects "
                f"{list(param.shape)}; check that the config name matches the checkpoint"
            )
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = tensor.detach().to(device=model.param_device(name), dtype=dtype)
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise FailedPreconditionError(
            f"the checkpoint lacks {len(missing)} tensors of the model: {shown}; check that the "
            "config name matches the checkpoint"
        )
    if tied:
        embed = model.model.embed_tokens.weight
        head_device = model.param_device("lm_head.weight")
        weight = embed
        if embed.device != head_device:
            weight = nn.Parameter(embed.detach().to(head_device), requires_grad=False)
        model.lm_head.weight = weight
    logger.debug("loaded %d tensors onto %s", len(loaded), sorted({str(d) for d in model.devices}))
