"""The runner protocol: what the engine core needs of a backend (torch, JAX, numpy).

A runner owns a model and its KV cache of `num_blocks` blocks of `block_size` positions. Each
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
    # order within each), then decode batches, then verifies (an entry per kept token).
    keys: tuple[SampleKey, ...] = ()
    # The sampled token of each key.
    tokens: tuple[int, ...] = ()
    # log p(token) under the model's raw distribution (temperature 1, no penalty).
    logprobs: tuple[float, ...] = ()
    # Score requests: request id -> log p(suffix | prefix) for each suffix.
    scores: Mapping[int, tuple[float, ...]] = field(default_factory=dict)


class Runner(Protocol):
    """Runs the engine's steps on a device. Called from the engine thread only."""

    # Sequences that run at once (one per running sample).
    num_slots: int
    # Positions per sequence (INPUT_SEQ_LEN + MAX_DECODE_STEPS).
    max_seq_len: int

    # The KV cache: blocks of block_size positions (`model_server.engine.kv_cache`). A backend
    # with one static slot per sequence has block_size = max_seq_len and a block per slot.
    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    # Token ids the model knows: [0, vocab_size).
    vocab_size: int
    # Whether a prompt may be prefilled in chunks over several steps (PrefillWork.start > 0);
    # such a runner checks speculative drafts too (VerifyWork).
    chunked_prefill: bool

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        """Runs one step: forgets the sampler state of `work.released`, scores `work.scores`,
        prefills `work.prefills` into their block tables (on a prompt's final chunk, making its
        `copies` and sampling every sample's first token; a resume samples nothing), decodes
        `work.decodes` and checks the drafts of `work.verifies` (when `chunked_prefill`)."""
        ...

    def close(self) -> None:
        """Frees the weights and the cache; the runner is not used afterwards."""
        ...
