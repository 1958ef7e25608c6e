"""Test-mode configs: small random weights, no checkpoint (Saxml's test mode)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from servables.registry import register
from servables.servable_config import ServableConfig


@register
@dataclass(frozen=True)
class TinyLM(ServableConfig):
    """A tiny byte-level language model with random weights, for trying the cell out.

    Its output is gibberish by design: it checks the serving path, not the model. Publish it with
    the checkpoint "None".
    """

    # Architecture: byte vocabulary (256 + BOS/EOS), small dims.
    vocab_size: int = 258
    num_layers: int = 2
    model_dim: int = 64
    # Seed of the random weights, so every replica serves the same model.
    seed: int = 1234

    batch_sizes: tuple[int, ...] = (1, 4)
    input_seq_len: int = 256
    max_decode_steps: int = 32
    num_samples: int = 2
    test_mode: bool = True
    extra_inputs: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType(
            {"temperature": 0.5, "per_example_max_decode_steps": 32, "seed": 0.0}
        )
    )

    def weight_bytes(self) -> int:
        per_layer = 2 * self.model_dim * self.model_dim
        return 4 * (2 * self.vocab_size * self.model_dim + self.num_layers * per_layer)
