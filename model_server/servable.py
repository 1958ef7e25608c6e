"""The servable interface: what a loaded model offers to the LM service.

A servable is built by `model_server.loader` from a `ServableConfig` and answers the LM
methods; `model_server.engine.engine_servable.EngineServable` implements it for every model.
Request inputs arrive as checked `servables.sampling_params.SamplingParams`, carrying the
call's deadline and a cancel event so that a servable stops work nobody waits for.

A servable may also implement `AsyncServable` (coroutines and async iterators); the LM service
then awaits it on the event loop instead of running the blocking methods in a thread, and
cancels it by cancelling the coroutine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from servables.sampling_params import SamplingParams


class StreamItem(NamedTuple):
    """One step of one sample of a streamed generation (Saxml's GenerateStreamItem).

    The caller rebuilds the text with `text_so_far = text_so_far[:prefix_len] + text`.
    """

    # New text to append.
    text: str
    # Leading characters of the text so far to keep before appending `text`.
    prefix_len: int
    # Scores so far (sum of token log-probabilities), one per score kind.
    scores: tuple[float, ...]
    # Tokens generated so far (0: not counted by this servable).
    num_tokens: int = 0
    # Why the sample ended, on its last item: "eos", "stop" (a stop string) or "length".
    finish_reason: str = ""
    # Tokens of the prompt as the model saw it (0: not counted).
    prompt_tokens: int = 0


class Generated(NamedTuple):
    """One generated sample (Saxml's DecodedText, with its token counts)."""

    text: str
    # Sum of the log-probabilities of the generated tokens.
    score: float
    # Tokens generated (0: not counted by this servable).
    num_tokens: int = 0
    # Why the sample ended: "eos", "stop" (a stop string) or "length" ("": not said).
    finish_reason: str = ""
    # Tokens of the prompt as the model saw it (0: not counted).
    prompt_tokens: int = 0


class Servable(Protocol):
    """A loaded model. Methods are blocking and thread-safe; callers run them off the event loop.

    A servable should stop early when `params.cancel` is set, and fail with DEADLINE_EXCEEDED
    once `params.deadline` has passed.
    """

    @property
    def method_names(self) -> tuple[str, ...]:
        """Methods served, e.g. ("lm.generate", "lm.generate_stream", "lm.score")."""
        ...

    def generate(self, prompt: str, params: SamplingParams) -> Sequence[Generated]:
        """`params.num_samples` continuations of prompt, best score first. A plain
        (text, score) pair counts as a `Generated` without token counts."""
        ...

    def generate_stream(self, prompt: str, params: SamplingParams) -> Iterator[list[StreamItem]]:
        """Yields one list per decode step with one `StreamItem` per sample (index = sample).

        Closing the iterator stops the generation.
        """
        ...

    def score(self, prefix: str, suffixes: Sequence[str], params: SamplingParams) -> list[float]:
        """log p(suffix | prefix) for each suffix."""
        ...

    def close(self) -> None:
        """Releases the weights and caches; the servable is not used afterwards."""
        ...


@runtime_checkable
class AsyncServable(Protocol):
    """Optional asyncio face of a servable, preferred by the LM service when present.

    Cancelling the coroutine (or closing the async iterator) aborts the work and frees its
    resources.
    """

    async def generate_async(self, prompt: str, params: SamplingParams) -> Sequence[Generated]:
        """Like `Servable.generate`."""
        ...

    def generate_stream_async(
        self, prompt: str, params: SamplingParams
    ) -> AsyncIterator[list[StreamItem]]:
        """Like `Servable.generate_stream`."""
        ...

    async def score_async(
        self, prefix: str, suffixes: Sequence[str], params: SamplingParams
    ) -> list[float]:
        """Like `Servable.score`."""
        ...
