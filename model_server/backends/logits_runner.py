"""`LogitsRunner`: the engine's `Runner` for a backend that gives logits, sampling on the host.

A backend implements three calls over its KV cache (`prefill_logits`, `decode_logits`,
`copy_slot`) and returns numpy float32 logits; this base runs a step of the scheduler's work
with them: score requests first (log p(suffix | prefix) from the prefix + suffix logits), then
prefills (the prompt run once into its first slot, its K/V copied to the other samples' slots,
every sample's first token drawn from the last position), then decode batches, then verifies
(a speculating sample's last token and draft run like a prompt chunk at its position, every
position's logits kept), and samples all rows with `host_sampling`. It also holds the
argument checks every backend shares.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from model_server.backends.host_sampling import SamplerState, log_softmax, sample, verify
from model_server.engine.runner import RunnerOutput
from model_server.engine.scheduler import SampleKey, SchedulerOutput, ScoreWork
from sax.errors import InvalidArgumentError


def smallest_at_least(sorted_values: Sequence[int], n: int) -> int | None:
    """The first value >= n of an ascending sequence; None when there is none."""
    i = bisect.bisect_left(sorted_values, n)
    return sorted_values[i] if i < len(sorted_values) else None


class RunnerChecks:
    """Argument checks shared by the runners: slots, token ids, buckets."""

    num_slots: int
    max_seq_len: int
    vocab_size: int
    # Decode batch sizes and prefill lengths, ascending.
    batch_sizes: tuple[int, ...]
    buckets: tuple[int, ...]
    # Whether prefills may start past position 0 (set by `LogitsRunner`).
    chunked_prefill: bool

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise InvalidArgumentError(f"slot {slot} is outside [0, {self.num_slots})")

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgumentError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )

    def _set_shapes(self, config: Any, num_slots: int) -> None:
        """Slots, slot length, vocabulary, batch sizes and prefill buckets of a Llama-style
        config (the padded shapes a backend compiles for)."""
        self.num_slots = num_slots
        self.max_seq_len = config.slot_len
        self.vocab_size = config.vocab_size
        self.batch_sizes = tuple(sorted(set(config.batch_sizes)))
        keys = config.bucket_keys or (config.input_seq_len,)
        self.buckets = tuple(sorted({k for k in keys if k < self.max_seq_len} | {self.max_seq_len}))

    def _check_prefill(self, slot: int | None, tokens: Sequence[int], start: int = 0) -> int:
        """Checks a prefill's arguments (tokens at positions [start, start + len) of a slot, or
        of a block table the caller checks: slot None); returns the padded length of the
        tokens."""
        if not tokens:
            raise InvalidArgumentError("prefill needs at least one token")
        if start < 0 or (start and not self.chunked_prefill):
            raise InvalidArgumentError(f"this runner prefills from position 0, not {start}")
        if slot is not None:
            self._check_slot(slot)
        self._check_tokens(tokens)
        padded = self.bucket(len(tokens))  # INVALID_ARGUMENT, with the fix, if too long
        if start + len(tokens) > self.max_seq_len:
            raise InvalidArgumentError(
                f"prefill positions [{start}, {start + len(tokens)}) pass the {self.max_seq_len} "
                "positions of a KV cache slot"
            )
        return padded

    def _check_decode(
        self,
        slots: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
        *,
        check_slots: bool = True,
    ) -> None:
        """Checks a decode's arguments; check_slots False: `slots` are only the rows (block
        tables the caller checks)."""
        n = len(slots)
        if n == 0 or len(tokens) != n or len(positions) != n:
            raise InvalidArgumentError(
                f"decode needs as many tokens and positions as slots, got {n}, {len(tokens)}, "
                f"{len(positions)}"
            )
        if check_slots and len(set(slots)) != n:
            raise InvalidArgumentError(f"decode slots must be distinct, got {list(slots)}")
        for slot in slots if check_slots else ():
            self._check_slot(slot)
        self._check_tokens(tokens)
        bad = [p for p in positions if not 0 <= p < self.max_seq_len]
        if bad:
            raise InvalidArgumentError(
                f"decode positions {bad[:5]} are outside a slot's [0, {self.max_seq_len})"
            )

    def _check_copy(self, src: int, dst: int, length: int) -> bool:
        """Checks a slot copy's arguments; returns whether there is anything to copy."""
        self._check_slot(src)
        self._check_slot(dst)
        if not 0 <= length <= self.max_seq_len:
            raise InvalidArgumentError(f"copy length {length} is outside [0, {self.max_seq_len}]")
        return src != dst and length > 0

    def bucket(self, length: int) -> int:
        """The padded prefill length of a prompt of `length` tokens; INVALID_ARGUMENT if none."""
        padded = smallest_at_least(self.buckets, length)
        if padded is None:
            raise InvalidArgumentError(
                f"the sequence is {length} tokens, more than the {self.max_seq_len} positions of "
                "a KV cache slot (INPUT_SEQ_LEN + MAX_DECODE_STEPS); shorten it or publish the "
                "model with a larger INPUT_SEQ_LEN"
            )
        return padded


class LogitsRunner(abc.ABC):
    """A `Runner` over a backend's logits; subclasses set num_slots, max_seq_len, vocab_size."""

    num_slots: int
    max_seq_len: int
    vocab_size: int
    # Tokens a sample may pick ([V] bool); None: all. Scores always use the whole vocabulary.
    allowed_tokens: np.ndarray | None = None
    # Whether prefill_logits takes start > 0 (a prompt's later chunk after its earlier ones).
    chunked_prefill: bool = False

    def __init__(self) -> None:
        self._sampler_states: dict[SampleKey, SamplerState] = {}

    # One block per sequence (its slot) unless a backend pages its cache.
    @property
    def block_size(self) -> int:
        """Positions per KV cache block."""
        return self.max_seq_len

    @property
    def num_blocks(self) -> int:
        """KV cache blocks."""
        return self.num_slots

    def prefill_blocks(
        self, blocks: Sequence[int], tokens: Sequence[int], *, all_logits: bool, start: int = 0
    ) -> np.ndarray:
        """`prefill_logits` into the sequence with block table `blocks` (by default its first
        block is its slot)."""
        return self.prefill_logits(blocks[0], tokens, all_logits=all_logits, start=start)

    @abc.abstractmethod
    def prefill_logits(
        self, slot: int, tokens: Sequence[int], *, all_logits: bool = True, start: int = 0
    ) -> np.ndarray:
        """Runs the tokens into `slot` at positions [start, start + len(tokens)) (K/V written
        there, attending to the slot's positions before `start` too) and returns float32 logits
        [len(tokens), V], or only the last position's [1, V] when all_logits is False. start > 0
        only when `chunked_prefill`."""

    @abc.abstractmethod
    def decode_logits(
        self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
    ) -> np.ndarray:
        """One step for several slots: token i is at position positions[i] of slot slots[i]
        and attends to that slot's positions <= positions[i]; writes its K/V and returns
        float32 logits [len(slots), V]."""

    @abc.abstractmethod
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copies K/V positions [0, length) of src into dst (prefill once, sample many)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Frees the weights and the cache; the runner is not used afterwards."""

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        states = self._sampler_states
        for key in work.released:
            states.pop(key, None)
        scores = {w.request_id: self.score(w) for w in work.scores}
        keys: list[SampleKey] = []
        for p in work.prefills:
            for key in p.sampled_keys:
                states[key] = SamplerState(p.samples[key[1]], self.vocab_size, p.tokens)
                keys.append(key)
        for batch in work.decodes:
            keys.extend(batch.keys)
        logits = self.step_logits(work)  # runs non-final chunks too
        if not keys and not work.verifies:
            return RunnerOutput(scores=scores)
        plain = len(keys)
        tokens, logp = sample(logits[:plain], [states[k] for k in keys], self.allowed_tokens)
        row = plain
        for v in work.verifies:
            rows = logits[row : row + len(v.tokens)]
            row += len(v.tokens)
            kept, kept_logp = verify(rows, states[v.key], v.draft, self.allowed_tokens)
            keys += [v.key] * len(kept)
            tokens += kept
            logp += kept_logp
        return RunnerOutput(tuple(keys), tuple(tokens), tuple(logp), scores)

    def step_logits(self, work: SchedulerOutput) -> np.ndarray:
        """Runs the step's prefills, decodes and verifies; returns the logits to sample from
        [R, V]: one row per sample of each final prompt chunk (the prompt's last position; its
        `copies` made for the other samples), then one per decode row, then one per token of
        each verify. A backend that runs them all in one pass overrides this."""
        rows: list[np.ndarray] = []
        for p in work.prefills:
            last = self.prefill_blocks(p.blocks, p.chunk, all_logits=False, start=p.start)
            for c in p.copies:
                self.copy_slot(c.src, c.dst, c.length)
            rows += [last] * len(p.sampled_keys)
        for batch in work.decodes:
            rows.append(self.decode_logits(batch.slots, batch.tokens, batch.positions))  # [B, V]
        for v in work.verifies:
            rows.append(self.prefill_blocks(v.blocks, v.tokens, all_logits=True, start=v.position))
        if not rows:
            return np.zeros((0, self.vocab_size), np.float32)
        return np.concatenate(rows) if len(rows) > 1 else rows[0]

    def score(self, work: ScoreWork) -> tuple[float, ...]:
        """log p(suffix | prefix) of each suffix, run in the work's blocks."""
        values = []
        n = len(work.prefix)
        for suffix in work.suffixes:
            if not suffix:
                values.append(0.0)
                continue
            logits = self.prefill_blocks(work.blocks, work.prefix + suffix, all_logits=True)
            logp = log_softmax(logits[n - 1 : n - 1 + len(suffix)])  # [S, V]
            values.append(float(logp[np.arange(len(suffix)), list(suffix)].sum()))
        return tuple(values)
