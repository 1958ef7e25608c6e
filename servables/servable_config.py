"""The servable config base class, the architecture interface and the strict override function.

A servable config is a frozen dataclass registered under a dotted name (see `registry`). Publish
overrides use Saxml's attribute names (`BATCH_SIZE=4`, `BUCKET_KEYS=[128,256]`) or the field
names, with JSON values; `apply_overrides` refuses unknown keys and bad types. A config that
serves a real model describes it with an `Architecture` (one class per family, next to the
family's configs in `servables.configs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sax.errors import InvalidArgumentError
from servables import platform

LM_METHODS = ("lm.generate", "lm.generate_stream", "lm.score")


def _frozen_dict(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(d))


class Architecture(Protocol):
    """The shape of one model family's network: what its checkpoints' config.json says and what
    its weights, KV cache and memory follow (e.g. `servables.configs.llama.LlamaArchitecture`,
    `servables.configs.bloom.BloomArchitecture`)."""

    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        ...

    @property
    def num_heads(self) -> int:
        """Query heads."""
        ...

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads."""
        ...

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        ...

    @property
    def model_dim(self) -> int:
        """Residual width."""
        ...

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary."""
        ...

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's inner activations."""
        ...

    @property
    def max_seq_len(self) -> int:
        """Positions the model serves at most."""
        ...

    @property
    def tie_embeddings(self) -> bool:
        """Whether the output projection is the token embeddings."""
        ...

    def to_hf_config(self) -> dict[str, Any]:
        """The architecture keys of a Hugging Face config.json."""
        ...

    def validate(self) -> None:
        """INVALID_ARGUMENT naming the first bad value."""
        ...

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor names and shapes, in layer order."""
        ...

    def num_params(self) -> int:
        """Parameters of the model."""
        ...

    def kv_bytes_per_token(self, dtype: str) -> int:
        """KV cache bytes of one position, in a compute dtype."""
        ...

    def check_checkpoint(
        self, checkpoint_config: Mapping[str, Any], path: str, *, config_name: str = ""
    ) -> None:
        """FAILED_PRECONDITION naming the first field where a checkpoint's config.json
        disagrees; config_name is the servable config the message names."""
        ...


@dataclass(frozen=True)
class ServableConfig:
    """Base of every servable LM config. Field docs say the Saxml attribute each one mirrors."""

    # Padded batch sizes the runner compiles for (BATCH_SIZE; an int means one size).
    batch_sizes: tuple[int, ...] = (1,)
    # Prompt length buckets (BUCKET_KEYS); empty means one bucket of input_seq_len. The JAX
    # backend compiles one prefill per bucket (prompts padded to the smallest that holds them);
    # torch runs prompts at their length. The largest bucket also caps the prompt length.
    bucket_keys: tuple[int, ...] = ()
    # Longest prompt in tokens (INPUT_SEQ_LEN).
    input_seq_len: int = 256
    # Most tokens generated per request (MAX_DECODE_STEPS).
    max_decode_steps: int = 32
    # Samples returned per Generate (NUM_SAMPLES).
    num_samples: int = 1
    # Device mesh (ICI_MESH_SHAPE); its product is the number of devices needed.
    ici_mesh_shape: tuple[int, ...] = (1, 1, 1)
    # Weight dtype: "float32", "bfloat16", "float16", or "auto": the backend picks at load
    # (bfloat16 on TPUs, on GPUs that compute in it and on CPUs with AVX-512 BF16 or AMX;
    # float32 elsewhere).
    dtype: str = "float32"
    # Weight quantization: "none", "int8" or "int4" (weight-only; the torch backend).
    quantization: str = "none"
    # Whether lm.generate_stream is served (ENABLE_GENERATE_STREAM).
    enable_generate_stream: bool = True
    # Random weights; the checkpoint path is ignored ("None" by convention).
    test_mode: bool = False
    # Extra inputs a request may set, with their defaults (EXTRA_INPUTS).
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: _frozen_dict({"temperature": 0.0})
    )
    # Chips the config can run on.
    chips: frozenset[str] = platform.ALL_CHIPS
    # Memory one replica needs in bytes (Saxml's "ram" override); 0: use the estimate.
    ram: int = 0

    # Saxml attribute name -> field name.
    OVERRIDE_ALIASES = types.MappingProxyType(
        {
            "BATCH_SIZE": "batch_sizes",
            "BUCKET_KEYS": "bucket_keys",
            "INPUT_SEQ_LEN": "input_seq_len",
            "MAX_DECODE_STEPS": "max_decode_steps",
            "NUM_SAMPLES": "num_samples",
            "ICI_MESH_SHAPE": "ici_mesh_shape",
            "EXTRA_INPUTS": "extra_inputs",
            "ENABLE_GENERATE_STREAM": "enable_generate_stream",
            "DTYPE": "dtype",
            "QUANTIZATION": "quantization",
            "RAM": "ram",
        }
    )

    def num_devices(self) -> int:
        """Devices the mesh needs."""
        return math.prod(self.ici_mesh_shape)

    def can_serve_on(self, chip: str, topology: str) -> bool:
        """Whether a server of this platform can host the config (chip kind and device count)."""
        return chip in self.chips and platform.num_devices(topology) == self.num_devices()

    def architecture(self) -> Architecture | None:
        """The model's architecture; None for configs without a checkpoint (test mode)."""
        return None

    def weight_bytes(self) -> int:
        """Bytes of the weights; configs with an architecture override it."""
        return 0

    def memory_bytes(self) -> int:
        """Memory one replica needs: the `ram` override, else weights plus 20% for caches."""
        if self.ram > 0:
            return self.ram
        return int(self.weight_bytes() * 1.2)

    def method_names(self) -> tuple[str, ...]:
        """Methods a replica serves."""
        if self.enable_generate_stream:
            return LM_METHODS
        return tuple(m for m in LM_METHODS if m != "lm.generate_stream")

    def validate(self) -> None:
        """Checks the values; INVALID_ARGUMENT naming the first bad one."""
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise InvalidArgumentError(f"BATCH_SIZE must be positive, got {list(self.batch_sizes)}")
        if any(b <= 0 for b in self.bucket_keys):
            raise InvalidArgumentError(
                f"BUCKET_KEYS must be positive, got {list(self.bucket_keys)}"
            )
        for name in ("input_seq_len", "max_decode_steps", "num_samples"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.ici_mesh_shape or any(d <= 0 for d in self.ici_mesh_shape):
            raise InvalidArgumentError(
                f"ICI_MESH_SHAPE must be positive, got {list(self.ici_mesh_shape)}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise InvalidArgumentError(
                f"dtype must be float32, bfloat16, float16 or auto: {self.dtype}"
            )
        if self.quantization not in ("none", "int8", "int4"):
            raise InvalidArgumentError(
                f"quantization must be none, int8 or int4: {self.quantization}"
            )
        if self.ram < 0:
            raise InvalidArgumentError(f"ram must be >= 0, got {self.ram}")


def check_checkpoint(
    config: ServableConfig, checkpoint_config: Mapping[str, Any], path: str
) -> None:
    """FAILED_PRECONDITION naming the first architecture field where the checkpoint at path (its
    metadata/config.json is checkpoint_config) and config disagree, e.g. a 7B checkpoint
    published with a 13B config. A config without an architecture accepts any checkpoint."""
    arch = config.architecture()
    if arch is not None:
        arch.check_checkpoint(checkpoint_config, path, config_name=type(config).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _convert(current: Any, value: Any) -> Any:
    """The value converted to the kind of `current`, or None if it does not fit."""
    if isinstance(current, bool):
        return value if isinstance(value, bool) else None
    if isinstance(current, int):
        return value if _is_int(value) else None
    if isinstance(current, float):
        return float(value) if _is_int(value) or isinstance(value, float) else None
    if isinstance(current, str):
        return value if isinstance(value, str) else None
    if isinstance(current, tuple):
        items = [value] if _is_int(value) else value
        ok = isinstance(items, list) and all(_is_int(v) for v in items)
        return tuple(items) if ok else None
    if isinstance(current, Mapping):
        ok = isinstance(value, dict)
        return _frozen_dict(value) if ok else None
    if isinstance(current, frozenset):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return frozenset(value) if ok else None
    return None


def _coerce(name: str, current: Any, value: Any) -> Any:
    """Converts a JSON-decoded value to the type of the field's current value, strictly."""
    converted = _convert(current, value)
    if converted is None:
        example = current
        if isinstance(current, (tuple, frozenset)):
            example = sorted(current) if isinstance(current, frozenset) else list(current)
        elif isinstance(current, Mapping):
            example = dict(current)
        raise InvalidArgumentError(
            f"override {name}: value {json.dumps(value)} has the wrong type; expected a value "
            f"like {json.dumps(example)}"
        )
    return converted


def override_keys(config: ServableConfig) -> list[str]:
    """Every key `apply_overrides` accepts for this config."""
    fields = [f.name for f in dataclasses.fields(config)]
    return sorted(set(fields) | set(config.OVERRIDE_ALIASES))


def apply_overrides(config: ServableConfig, overrides: Mapping[str, str]) -> ServableConfig:
    """Returns the config with publish overrides applied. Keys are Saxml attribute names or field
    names; values are JSON. Unknown keys, bad JSON and wrong types are INVALID_ARGUMENT."""
    if not overrides:
        return config
    field_names = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for key, raw in sorted(overrides.items()):
        name = config.OVERRIDE_ALIASES.get(key, key if key in field_names else None)
        if name is None or name not in field_names:
            raise InvalidArgumentError(
                f"unknown override key {key!r} for {type(config).__name__}; known keys: "
                f"{', '.join(k for k in override_keys(config) if k.isupper())} (or field names)"
            )
        try:
            value = json.loads(raw)
        except (TypeError, json.JSONDecodeError) as e:
            raise InvalidArgumentError(
                f"override {key}: {raw!r} is not JSON (strings need double quotes: "
                f'{key}=\\"text\\")'
            ) from e
        changes[name] = _coerce(key, getattr(config, name), value)
    new = dataclasses.replace(config, **changes)
    new.validate()
    return new
