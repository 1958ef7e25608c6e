"""The model families a checkpoint may hold, by the `model_type` of its config.json.

Import-light (no torch): the converters, `saxutil estimate` and the loader read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sax.errors import InvalidArgumentError
from servables.configs.bloom import BloomArchitecture
from servables.configs.llama import LlamaArchitecture
from servables.servable_config import Architecture

# model_type -> the architecture read from a config.json of that family.
ARCHITECTURES: Mapping[str, Callable[[Mapping[str, Any]], Architecture]] = {
    "llama": LlamaArchitecture.from_hf_config,
    "bloom": BloomArchitecture.from_hf_config,
}
MODEL_TYPES = tuple(ARCHITECTURES)


def model_type(config: Mapping[str, Any], what: str) -> str:
    """The family of a config.json (Llama when it names none, as checkpoints converted from
    GGUF and Meta files did); INVALID_ARGUMENT naming the supported ones otherwise."""
    found = config.get("model_type") or "llama"
    if found not in ARCHITECTURES:
        raise InvalidArgumentError(
            f"{what}: model_type {found!r} is not supported; supported: {', '.join(MODEL_TYPES)}"
        )
    return str(found)


def architecture(config: Mapping[str, Any], what: str) -> Architecture:
    """The architecture a config.json describes (`model_type` picks the family)."""
    return ARCHITECTURES[model_type(config, what)](config)
