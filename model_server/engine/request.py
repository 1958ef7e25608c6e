"""The engine's data types: a request as the engine sees it (token ids, per-sample sampling
options, limits) and the outputs it hands back to the caller.

No torch here: the scheduler and its tests use these types without a device.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sax.errors import SaxError


class RequestKind(enum.Enum):
    """What a request asks for."""

    # Sample continuations of the prompt (lm.generate, lm.generate_stream).
    GENERATE = "generate"
    # log p(suffix | prompt) for each suffix (lm.score).
    SCORE = "score"


class FinishReason(enum.Enum):
    """Why a sample stopped."""

    # The model produced an end-of-sequence token (not part of the text or the score).
    EOS = "eos"
    # The text reached a stop string (the text ends before it).
    STOP = "stop"
    # The sample used its decode steps, or its sequence is at its longest.
    LENGTH = "length"


@dataclass(frozen=True)
class SampleOptions:
    """How one sample picks its tokens (see `sampling.sample`)."""

    # Softmax temperature; 0 is greedy.
    temperature: float = 0.0
    # Keep the k likeliest tokens; 0: all, 1: greedy.
    top_k: int = 0
    # Keep the smallest set of tokens whose probability reaches top_p (after top_k); 1: all.
    top_p: float = 1.0
    # CTRL-style penalty on tokens seen in the prompt or the output; 1: none.
    repetition_penalty: float = 1.0
    # Seed of the sample's random generator (a request's seed + the sample index).
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """Temperature 0 or top_k 1: the likeliest token, no randomness."""
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class Request:
    """One caller's request, in tokens.

    A GENERATE request runs `len(samples)` samples, each in its own sequence of KV cache
    blocks, for up to `max_decode_steps` tokens. A SCORE request borrows blocks for one engine
    step.
    """

    # Unique per engine (`Engine.new_request_id`).
    request_id: int
    kind: RequestKind
    # Prompt (GENERATE) or prefix (SCORE) token ids, BOS included when the tokenizer adds one.
    prompt: tuple[int, ...]
    # One entry per sample (GENERATE); empty for SCORE.
    samples: tuple[SampleOptions, ...] = ()
    # Most tokens generated per sample (GENERATE).
    max_decode_steps: int = 0
    # Stop strings: a sample's text ends before the first one it produces (GENERATE).
    stop: tuple[str, ...] = ()
    # Suffix token ids to score after the prompt (SCORE).
    suffixes: tuple[tuple[int, ...], ...] = ()
    # `time.monotonic()` after which the request fails with DEADLINE_EXCEEDED; None: none.
    deadline: float | None = None
    # Set by the caller to abort the request; checked before every engine step.
    cancel: threading.Event | None = field(default=None, compare=False)
    # End-of-sequence tokens do not end a sample (GENERATE; benchmarks of fixed output lengths).
    ignore_eos: bool = False
    # Draft tokens per decode step by prompt lookup (`prompt_lookup`), checked by the model in
    # the same pass; 0: no speculation (GENERATE). The tokens are the ones decoding one at a
    # time would give (greedy), or follow the same distribution (sampling).
    speculative_tokens: int = 0

    @property
    def slots_needed(self) -> int:
        """Sequences the request holds while it runs (one per sample)."""
        return max(1, len(self.samples))

    @property
    def prefill_tokens(self) -> int:
        """Tokens the request's prefill runs through the model."""
        if self.kind is RequestKind.SCORE:
            return sum(len(self.prompt) + len(s) for s in self.suffixes)
        return len(self.prompt)

    def cancelled(self) -> bool:
        """Whether the caller has set the cancel event."""
        return self.cancel is not None and self.cancel.is_set()


@dataclass(frozen=True)
class SampleOutput:
    """The news of one sample in one engine step (Saxml's GenerateStreamItem, plus state)."""

    # Sample index within the request.
    index: int
    # New text; the caller's text becomes `text_so_far[:prefix_len] + text`.
    text: str
    # Characters of the text so far to keep before appending `text`.
    prefix_len: int
    # Sum of the log-probabilities of the sample's tokens so far (EOS excluded).
    score: float
    # Set on the step the sample finishes.
    finish_reason: FinishReason | None = None
    # Tokens the sample has generated so far, an end-of-sequence token that ended it included
    # (as OpenAI-style servers count them).
    num_tokens: int = 0


@dataclass(frozen=True)
class RequestOutput:
    """What the engine hands a caller after a step that changed its request.

    Exactly one output per request has `finished` set; it is the last one. `error` is set when
    the request failed or was aborted (cancel, deadline, shutdown, runner failure).
    """

    request_id: int
    # GENERATE: one entry per sample, in sample order.
    samples: tuple[SampleOutput, ...] = ()
    # SCORE: log p(suffix | prompt) for each suffix.
    logp: tuple[float, ...] = ()
    finished: bool = False
    error: SaxError | None = None


# Receives a request's outputs on the engine thread; must be quick and must not block.
OutputSink = Callable[[RequestOutput], None]
