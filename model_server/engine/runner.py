"""The runner protocol: what the engine core needs of a backend (torch, JAX, numpy).

A runner owns a model and its KV cache of `num_slots` slots of `max_seq_len` positions. Each
engine step hands it the scheduler's work (`SchedulerOutput`: score requests, prefills, decode
batches, and the samples that ended since the last step); the runner runs the model, samples on
its side with each sample's options, and returns token ids and their log-probabilities, never
logits (vLLM v1's ModelRunnerOutput). The engine core therefore imports no array library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from model_server.engine.scheduler import SampleKey, SchedulerOutput


@dataclass(frozen=True)
class RunnerOutput:
    """What one step produced."""

    # One entry per prefilled or decoded sample, in the order of the work: prefills (sample
    # order within each), then decode batches.
    keys: tuple[SampleKey, ...] = ()
    # The sampled token of each key.
    tokens: tuple[int, ...] = ()
    # log p(token) under the model's raw distribution (temperature 1, no penalty).
    logprobs: tuple[float, ...] = ()
    # Score requests: request id -> log p(suffix | prefix) for each suffix.
    scores: Mapping[int, tuple[float, ...]] = field(default_factory=dict)


class Runner(Protocol):
    """Runs the engine's steps on a device. Called from the engine thread only."""

    # KV cache slots (one per running sample).
    num_slots: int
    # Positions per slot (INPUT_SEQ_LEN + MAX_DECODE_STEPS).
    max_seq_len: int
    # Token ids the model knows: [0, vocab_size).
    vocab_size: int
    # Whether a prompt may be prefilled in chunks over several steps (PrefillWork.start > 0).
    chunked_prefill: bool

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        """Runs one step: forgets the sampler state of `work.released`, scores `work.scores`,
        prefills `work.prefills` (on a prompt's final chunk, copying its K/V to each of its
        samples' slots and sampling every sample's first token) and decodes `work.decodes`."""
        ...

    def close(self) -> None:
        """Frees the weights and the cache; the runner is not used afterwards."""
        ...
