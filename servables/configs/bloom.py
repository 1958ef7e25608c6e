"""The BLOOM family: its architecture (`BloomArchitecture`) and its servable configs, BigScience's
bloom-560m, bloom-1b7 and bloom-7b1 and Firefly's BLOOM-based chat models (firefly-bloom-1b4 and
-2b6, BLOOM with its vocabulary cut to the 46145 tokens of Chinese and English text).

BLOOM differs from Llama in every block: ALiBi (a per-head linear bias on the attention scores,
no position embeddings), a LayerNorm after the word embeddings, LayerNorms with biases, one fused
`query_key_value` projection in a per-head interleaved layout ([q, k, v] of head 0, then of
head 1, ...), biases on every projection, a GELU MLP four times as wide as the residual, and an
output projection tied to the embeddings.

Import-light (no torch). A checkpoint's config.json uses BLOOM's keys (`n_layer`, `n_head`,
`hidden_size` or `n_embed`, `layer_norm_epsilon`; the original releases spell some of them
`num_attention_heads`, `num_hidden_layers`); its tensors take transformers' names
(`transformer.h.N.self_attention.query_key_value.weight`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from sax.errors import FailedPreconditionError, InvalidArgumentError
from servables import memory, platform
from servables.decoder_config import DecoderConfig, default_extra_inputs
from servables.registry import register

# Firefly's chat format: each user turn "<s>{user}</s></s>", each assistant turn
# "{assistant}</s>"; the prompt ends after the last user turn, where the reply begins. A system
# message has no place in it and is refused.
FIREFLY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token }}{{ message['content'] }}{{ eos_token }}{{ eos_token }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] }}{{ eos_token }}"
    "{% else %}"
    "{{ raise_exception('Firefly chats take user and assistant messages, not ' + "
    "message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
)


def alibi_slopes(num_heads: int, heads: Sequence[int] | None = None) -> list[float]:
    """ALiBi's slope of each head, as BLOOM computes them: for the largest power of two n <= H,
    2^(-8i/n) for i = 1..n, then (when H is not a power of two) the odd powers of the slopes of
    2n heads for the rest. heads: the global indices wanted (a shard of the heads); default all."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes += [extra**p for p in range(1, 1 + 2 * remaining, 2)]
    return [slopes[h] for h in (range(num_heads) if heads is None else heads)]


@dataclass(frozen=True)
class BloomArchitecture:
    """The shape of a BLOOM decoder: what a checkpoint's config.json says (`from_hf_config`,
    `to_hf_config`), and what the weights (`tensor_shapes`, `num_params`) and the KV cache
    (`kv_bytes_per_token`) follow. Multi-head attention; the MLP is 4 x model_dim wide."""

    # Decoder layers.
    num_layers: int
    # Attention heads (every one with its own keys and values).
    num_heads: int
    # Residual width.
    model_dim: int
    # Vocabulary.
    vocab_size: int
    # LayerNorm epsilon.
    norm_eps: float = 1e-5
    # Positions served at most (ALiBi has no table; BLOOM was trained on 2048).
    max_seq_len: int = 2048
    # Whether a block's residual is its input's LayerNorm instead of its input (transformers'
    # apply_residual_connection_post_layernorm; False in every BLOOM release).
    residual_post_norm: bool = False

    # The output projection is always the word embeddings.
    tie_embeddings = True

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: one per query head."""
        return self.num_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.model_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's inner activations."""
        return 4 * self.model_dim

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> BloomArchitecture:
        """From a BLOOM config.json; absent optional keys take transformers' BloomConfig
        defaults. INVALID_ARGUMENT when a required key is missing or a value is not a number."""
        try:
            dim = config.get("n_embed") or config["hidden_size"]
            return cls(
                num_layers=int(config.get("n_layer") or config["num_hidden_layers"]),
                num_heads=int(config.get("n_head") or config["num_attention_heads"]),
                model_dim=int(dim),
                vocab_size=int(config["vocab_size"]),
                norm_eps=float(config.get("layer_norm_epsilon") or 1e-5),
                max_seq_len=int(config.get("seq_length") or 2048),
                residual_post_norm=bool(config.get("apply_residual_connection_post_layernorm")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgumentError(
                f"config.json lacks a BLOOM architecture field or has a bad value ({e!r}); it "
                "needs n_layer, n_head, hidden_size (or n_embed) and vocab_size"
            ) from e

    def to_hf_config(self) -> dict[str, Any]:
        """The architecture keys of a BLOOM config.json."""
        return {
            "n_layer": self.num_layers,
            "n_head": self.num_heads,
            "hidden_size": self.model_dim,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.norm_eps,
            "seq_length": self.max_seq_len,
            "apply_residual_connection_post_layernorm": self.residual_post_norm,
            "tie_word_embeddings": True,
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical (transformers' BloomForCausalLM) tensor names and shapes, in layer order;
        no lm_head.weight (tied)."""
        d, f, v = self.model_dim, self.hidden_dim, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {
            "transformer.word_embeddings.weight": (v, d),
            "transformer.word_embeddings_layernorm.weight": (d,),
            "transformer.word_embeddings_layernorm.bias": (d,),
        }
        for i in range(self.num_layers):
            p = f"transformer.h.{i}."
            for name, shape in (
                ("input_layernorm", (d,)),
                ("self_attention.query_key_value", (3 * d, d)),
                ("self_attention.dense", (d, d)),
                ("post_attention_layernorm", (d,)),
                ("mlp.dense_h_to_4h", (f, d)),
                ("mlp.dense_4h_to_h", (d, f)),
            ):
                shapes[f"{p}{name}.weight"] = shape
                shapes[f"{p}{name}.bias"] = (shape[0],)
        shapes["transformer.ln_f.weight"] = (d,)
        shapes["transformer.ln_f.bias"] = (d,)
        return shapes

    def num_params(self) -> int:
        """Parameters of the model (the tied output projection counts once)."""
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of one position over every layer, in bytes of dtype."""
        return self.num_layers * 2 * self.model_dim * memory.dtype_bytes(dtype)

    def validate(self) -> None:
        """INVALID_ARGUMENT naming the first bad value."""
        for name in ("num_layers", "num_heads", "model_dim", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        if self.model_dim % self.num_heads:
            raise InvalidArgumentError(
                f"model_dim {self.model_dim} is not a multiple of num_heads {self.num_heads}"
            )
        if self.norm_eps <= 0:
            raise InvalidArgumentError(f"norm_eps must be positive, got {self.norm_eps}")

    def check_checkpoint(
        self, checkpoint_config: Mapping[str, Any], path: str, *, config_name: str = ""
    ) -> None:
        """FAILED_PRECONDITION when the checkpoint at path is not a BLOOM or disagrees on a
        field that decides the weights' shapes; config_name is the servable config the message
        names. Keys the checkpoint lacks are not compared."""
        config = f"the config {config_name}" if config_name else "the config"
        model_type = checkpoint_config.get("model_type") or "llama"
        if model_type != "bloom":
            raise FailedPreconditionError(
                f"checkpoint {path} holds a {model_type!r} model but {config} serves BLOOM; "
                "publish it with a config of its family"
            )

        def key(*names: str) -> Any:
            return next((checkpoint_config[n] for n in names if n in checkpoint_config), None)

        theirs = {
            "n_layer": key("n_layer", "num_hidden_layers"),
            "n_head": key("n_head", "num_attention_heads"),
            "hidden_size": key("n_embed", "hidden_size"),
            "vocab_size": key("vocab_size"),
        }
        ours = {
            "n_layer": ("num_layers", self.num_layers),
            "n_head": ("num_heads", self.num_heads),
            "hidden_size": ("model_dim", self.model_dim),
            "vocab_size": ("vocab_size", self.vocab_size),
        }
        for key, (name, value) in ours.items():
            if theirs[key] is not None and theirs[key] != value:
                raise FailedPreconditionError(
                    f"checkpoint {path} has {key}={theirs[key]} but {config} has {name}={value}; "
                    "publish it with the config that matches the checkpoint"
                )


_ARCHITECTURE_FIELDS = tuple(f.name for f in fields(BloomArchitecture))


@dataclass(frozen=True)
class BloomConfig(DecoderConfig):
    """A BLOOM decoder. Defaults are bloom-560m in float32.

    The architecture fields (num_layers ... residual_post_norm) are `BloomArchitecture`'s, flat
    so that publish overrides (NUM_LAYERS=2) reach them; `architecture()` gathers them."""

    # Decoder layers (NUM_LAYERS).
    num_layers: int = 24
    # Attention heads (NUM_HEADS); head dim = model_dim / num_heads.
    num_heads: int = 16
    # Residual width (MODEL_DIMS); the MLP is 4 x as wide.
    model_dim: int = 1024
    # Vocabulary (VOCAB_SIZE).
    vocab_size: int = 250880
    # LayerNorm epsilon (LAYER_NORM_EPSILON).
    norm_eps: float = 1e-5
    # Positions served at most; INPUT_SEQ_LEN + MAX_DECODE_STEPS must not exceed it.
    max_seq_len: int = 2048
    # transformers' apply_residual_connection_post_layernorm.
    residual_post_norm: bool = False

    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    input_seq_len: int = 1024
    max_decode_steps: int = 256
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: default_extra_inputs(0.0, 0, 1.0, 256)
    )
    chips: frozenset[str] = platform.GPU_CHIPS | {"cpu"}

    OVERRIDE_ALIASES = types.MappingProxyType(
        {
            **DecoderConfig.OVERRIDE_ALIASES,
            "NUM_LAYERS": "num_layers",
            "NUM_HEADS": "num_heads",
            "MODEL_DIMS": "model_dim",
            "VOCAB_SIZE": "vocab_size",
            "LAYER_NORM_EPSILON": "norm_eps",
        }
    )

    def architecture(self) -> BloomArchitecture:
        """The architecture fields as one description."""
        return BloomArchitecture(**{name: getattr(self, name) for name in _ARCHITECTURE_FIELDS})


# Firefly's BLOOM models keep BLOOM's shapes with a vocabulary of 46145 tokens.
_FIREFLY_VOCAB = 46145


@register
@dataclass(frozen=True)
class Bloom560M(BloomConfig):
    """bigscience/bloom-560m on a CPU or one GPU, float32, greedy by default."""


@register
@dataclass(frozen=True)
class Bloom1B7(BloomConfig):
    """bigscience/bloom-1b7 on a CPU or one GPU."""

    model_dim: int = 2048
    dtype: str = "auto"


@register
@dataclass(frozen=True)
class Bloom7B1(BloomConfig):
    """bigscience/bloom-7b1 in bfloat16 on one GPU."""

    num_layers: int = 30
    num_heads: int = 32
    model_dim: int = 4096
    dtype: str = "bfloat16"
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    chips: frozenset[str] = platform.GPU_CHIPS


@register
@dataclass(frozen=True)
class Firefly1B4(Bloom1B7):
    """YeungNLP/firefly-bloom-1b4: bloom-1b7's shape, Firefly's 46145-token vocabulary; a
    Chinese and English chat model (`FIREFLY_CHAT_TEMPLATE`), sampling by default."""

    vocab_size: int = _FIREFLY_VOCAB
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: default_extra_inputs(0.35, 0, 0.85, 256)
    )


@register
@dataclass(frozen=True)
class Firefly2B6(Firefly1B4):
    """YeungNLP/firefly-bloom-2b6: bloom-3b's shape (30 layers, 32 heads, 2560 wide) with
    Firefly's vocabulary."""

    num_layers: int = 30
    num_heads: int = 32
    model_dim: int = 2560
