"""`EngineServable`: the `Servable` (and `AsyncServable`) of a model served by the batching
engine, over a tokenizer and a runner.

It turns text into token requests (checking the prompt against the model's largest bucket, or
keeping its last tokens when the config says `truncate_prompt`), submits them to the `Engine`,
and turns the engine's outputs back into texts, stream items and scores. The blocking methods
wait on a queue; the async ones on the event loop. Leaving a call early (closing the stream,
cancelling the coroutine, setting `params.cancel`) aborts the request, which frees its KV cache
blocks before the next engine step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from typing import Protocol

from model_server.engine.engine import Engine, EngineStats
from model_server.engine.request import (
    FinishReason,
    Request,
    RequestKind,
    RequestOutput,
    SampleOptions,
)
from model_server.engine.runner import Runner
from model_server.servable import Generated, StreamItem
from sax.errors import CancelledError, InvalidArgumentError
from servables.configs.llama import IGNORE_EOS
from servables.sampling_params import SamplingParams
from servables.servable_config import ServableConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 64
_TRUNCATE_HINT = ", or publish the model with TRUNCATE_PROMPT=true to keep the prompt's last tokens"


class TextTokenizer(Protocol):
    """What the servable needs of a tokenizer (`model_server.engine.tokenizer.Tokenizer`,
    TinyLM's `ByteTokenizer`)."""

    bos_id: int | None
    eos_ids: Sequence[int]
    add_bos: bool

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


def _cancelled() -> CancelledError:
    return CancelledError("the caller cancelled the request")


def _stopped_reading() -> CancelledError:
    return CancelledError("the caller stopped reading the request's outputs")


def _flag(value: object, name: str) -> bool:
    """A 0/1 scalar extra input as a bool; INVALID_ARGUMENT for anything else."""
    if isinstance(value, float) and value in (0.0, 1.0):
        return value == 1.0
    raise InvalidArgumentError(f"extra input {name!r} must be 0 or 1, got {value!r}")


def _reason(reason: FinishReason | None) -> str:
    return "" if reason is None else reason.value


def _stream_items(output: RequestOutput, prompt_tokens: int) -> list[StreamItem]:
    return [
        StreamItem(
            s.text, s.prefix_len, (s.score,), s.num_tokens, _reason(s.finish_reason), prompt_tokens
        )
        for s in output.samples
    ]


class _Texts:
    """Rebuilds each sample's text, score and counts from the outputs (Saxml's prefix_len
    rule)."""

    def __init__(self, request: Request) -> None:
        n = len(request.samples)
        self.prompt_tokens = len(request.prompt)
        self.texts = [""] * n
        self.scores = [0.0] * n
        self.tokens = [0] * n
        self.reasons = [""] * n

    def add(self, output: RequestOutput) -> None:
        for s in output.samples:
            self.texts[s.index] = self.texts[s.index][: s.prefix_len] + s.text
            self.scores[s.index] = s.score
            self.tokens[s.index] = s.num_tokens
            if s.finish_reason is not None:
                self.reasons[s.index] = s.finish_reason.value

    def best_first(self) -> list[Generated]:
        rows = [
            Generated(text, score, tokens, reason, self.prompt_tokens)
            for text, score, tokens, reason in zip(
                self.texts, self.scores, self.tokens, self.reasons, strict=True
            )
        ]
        return sorted(rows, key=lambda r: r.score, reverse=True)


class EngineServable:
    """A model served with continuous batching. Thread-safe; `close` once at unload."""

    def __init__(
        self,
        config: ServableConfig,
        runner: Runner,
        tokenizer: TextTokenizer,
        *,
        eos_ids: Collection[int] = (),
        token_budget: int | None = None,
    ) -> None:
        """`eos_ids` adds end-of-sequence ids to the tokenizer's (e.g. the checkpoint config's
        `eos_token_id`). The config's `max_queue` and `truncate_prompt` are used when present."""
        self._config = config
        self._runner = runner
        self._tokenizer = tokenizer
        limit = config.input_seq_len
        if config.bucket_keys:
            limit = min(limit, max(config.bucket_keys))
        self.prompt_limit = min(limit, runner.max_seq_len - 1)
        self._truncate = bool(getattr(config, "truncate_prompt", False))
        self._engine = Engine(
            runner,
            decode=tokenizer.decode,
            eos_ids={*tokenizer.eos_ids, *eos_ids},
            max_queue=int(getattr(config, "max_queue", DEFAULT_MAX_QUEUE)),
            max_batch_size=max(config.batch_sizes),
            token_budget=token_budget or getattr(config, "max_num_batched_tokens", 0) or None,
            prefix_caching=bool(getattr(config, "prefix_caching", True)),
        )

    @property
    def method_names(self) -> tuple[str, ...]:
        return self._config.method_names()

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    def stats(self) -> EngineStats:
        """The engine's load now."""
        return self._engine.stats()

    # Requests.

    def _fit(self, tokens: list[int], limit: int, what: str, extra: int = 0) -> list[int]:
        """tokens, or their last ones when they are too long and the config truncates. `extra`
        tokens follow them (a scored suffix) within the limit."""
        room = limit - extra
        if len(tokens) <= room:
            return tokens
        if not self._truncate or room <= 0:
            hint = "" if self._truncate else _TRUNCATE_HINT
            raise InvalidArgumentError(
                f"{what} is {len(tokens) + extra} tokens, longer than the model's limit of "
                f"{limit} tokens; shorten it{hint}"
            )
        if self._tokenizer.add_bos and tokens[0] == self._tokenizer.bos_id and room > 1:
            return [tokens[0], *tokens[len(tokens) - room + 1 :]]
        return tokens[len(tokens) - room :]

    def _tokens(self, text: str, what: str) -> list[int]:
        tokens = self._tokenizer.encode(text)
        if not tokens:
            raise InvalidArgumentError(
                f"{what} is empty and the model's tokenizer adds no BOS token; give it some text"
            )
        return self._in_vocab(tokens, what)

    def _in_vocab(self, tokens: list[int], what: str) -> list[int]:
        """Refuses token ids the model has no embedding for (a tokenizer with added tokens
        beyond the config's vocab_size), before they can fail a whole engine step."""
        bad = [t for t in tokens if not 0 <= t < self._runner.vocab_size]
        if bad:
            raise InvalidArgumentError(
                f"{what} has token ids {bad[:5]} outside the model's vocabulary of "
                f"{self._runner.vocab_size}; remove the special tokens it does not know"
            )
        return tokens

    def _generate_request(self, prompt: str, params: SamplingParams) -> Request:
        tokens = tuple(
            self._fit(self._tokens(prompt, "the prompt"), self.prompt_limit, "the prompt")
        )
        base = params.seed or secrets.randbits(62) + 1
        samples = tuple(
            SampleOptions(
                temperature=t,
                top_k=params.top_k,
                top_p=params.top_p,
                repetition_penalty=params.repetition_penalty,
                seed=base + i,
            )
            for i, t in enumerate(params.temperatures)
        )
        return Request(
            request_id=self._engine.new_request_id(),
            kind=RequestKind.GENERATE,
            prompt=tokens,
            samples=samples,
            max_decode_steps=params.max_decode_steps,
            stop=params.stop,
            deadline=params.deadline,
            cancel=params.cancel,
            ignore_eos=_flag(params.values.get(IGNORE_EOS, 0.0), IGNORE_EOS),
            speculative_tokens=params.speculative_tokens,
        )

    def _score_request(
        self, prefix: str, suffixes: Sequence[str], params: SamplingParams
    ) -> Request:
        tails = tuple(
            tuple(self._in_vocab(self._tokenizer.encode(s, add_bos=False), "a suffix"))
            for s in suffixes
        )
        head = self._fit(self._tokens(prefix, "the prefix"), self.prompt_limit, "the prefix")
        longest = max((len(t) for t in tails), default=0)
        what = "the prefix plus the longest suffix"
        head = self._fit(head, self._runner.max_seq_len, what, extra=longest)
        return Request(
            request_id=self._engine.new_request_id(),
            kind=RequestKind.SCORE,
            prompt=tuple(head),
            suffixes=tails,
            deadline=params.deadline,
            cancel=params.cancel,
        )

    # Blocking API (model_server.servable.Servable).

    def _outputs(self, request: Request) -> Iterator[RequestOutput]:
        """Submits the request when first iterated; leaving early aborts it."""
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._engine.submit(request, outputs.put)
        finished = False
        try:
            while not finished:
                output = outputs.get()
                finished = output.finished
                if output.error is not None:
                    raise output.error
                if request.cancelled():  # outputs made before the engine saw the cancel
                    if not finished:
                        self._engine.abort(request.request_id, _cancelled())
                        while not outputs.get().finished:  # its blocks are free after this
                            pass
                        finished = True
                    raise _cancelled()
                yield output
        finally:
            if not finished:
                self._engine.abort(request.request_id, _stopped_reading())

    def generate(self, prompt: str, params: SamplingParams) -> list[Generated]:
        request = self._generate_request(prompt, params)
        texts = _Texts(request)
        for output in self._outputs(request):
            texts.add(output)
        return texts.best_first()

    def generate_stream(self, prompt: str, params: SamplingParams) -> Iterator[list[StreamItem]]:
        request = self._generate_request(prompt, params)  # bad input fails here, not later
        return self._stream(request)

    def _stream(self, request: Request) -> Iterator[list[StreamItem]]:
        outputs = self._outputs(request)
        try:
            for output in outputs:
                if output.samples:
                    yield _stream_items(output, len(request.prompt))
        finally:
            outputs.close()

    def score(self, prefix: str, suffixes: Sequence[str], params: SamplingParams) -> list[float]:
        logp: list[float] = []
        for output in self._outputs(self._score_request(prefix, suffixes, params)):
            logp = list(output.logp)
        return logp

    # asyncio API (model_server.servable.AsyncServable).

    async def _outputs_async(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Like `_outputs`, on the running event loop."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, output)

        self._engine.submit(request, sink)
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finished
                if output.error is not None:
                    raise output.error
                if request.cancelled():  # outputs made before the engine saw the cancel
                    if not finished:
                        self._engine.abort(request.request_id, _cancelled())
                        while not (await outputs.get()).finished:
                            pass
                        finished = True
                    raise _cancelled()
                yield output
        finally:
            if not finished:
                self._engine.abort(request.request_id, _stopped_reading())

    async def generate_async(self, prompt: str, params: SamplingParams) -> list[Generated]:
        request = self._generate_request(prompt, params)
        texts = _Texts(request)
        outputs = self._outputs_async(request)
        try:
            async for output in outputs:
                texts.add(output)
        finally:
            await outputs.aclose()
        return texts.best_first()

    async def generate_stream_async(
        self, prompt: str, params: SamplingParams
    ) -> AsyncIterator[list[StreamItem]]:
        request = self._generate_request(prompt, params)
        outputs = self._outputs_async(request)
        try:
            async for output in outputs:
                if output.samples:
                    yield _stream_items(output, len(request.prompt))
        finally:
            await outputs.aclose()

    async def score_async(
        self, prefix: str, suffixes: Sequence[str], params: SamplingParams
    ) -> list[float]:
        logp: list[float] = []
        outputs = self._outputs_async(self._score_request(prefix, suffixes, params))
        try:
            async for output in outputs:
                logp = list(output.logp)
        finally:
            await outputs.aclose()
        return logp

    def close(self) -> None:
        """Stops the engine (pending requests fail with UNAVAILABLE) and frees the runner."""
        if self._engine.close():
            self._runner.close()
        else:  # a step is still running on it: its memory goes with the engine thread
            logger.warning(
                "engine of %s did not stop; its runner is left to it", type(self._config).__name__
            )
