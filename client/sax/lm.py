"""Language-model calls: `LanguageModel.Generate`, `GenerateStream` and `Score`.

Each call picks a replica round-robin from the model's watched address set and calls it
directly. UNAVAILABLE, RESOURCE_EXHAUSTED and NOT_FOUND from a model server are retried on the
next replica with bounded backoff, all within the call's deadline (DEFAULT_DATA_TIMEOUT when the
caller sets none), which also goes to gRPC as the call timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import grpc

from sax import channels, location, retry
from sax.errors import DeadlineExceededError, InvalidArgumentError, SaxError, error_for_code
from sax.errors import from_rpc_error as _from_rpc_error
from sax.naming import ModelName
from sax.options import ModelOptions, Options
from sax.v1 import common_pb2, lm_pb2, lm_pb2_grpc

logger = logging.getLogger(__name__)

#: Deadline of a data call (Generate, GenerateStream, Score) when the caller sets none, seconds.
DEFAULT_DATA_TIMEOUT = 60.0

#: One streamed item: (text to append, prefix_len to keep first, scores so far).
StreamItem = tuple[str, int, list[float]]
#: GenerateStream's callback: callback(last, items).
StreamCallback = Callable[[bool, list[StreamItem]], None]


class Completion(NamedTuple):
    """One generated sample with the model server's token counts (`GenerateCounted`)."""

    text: str
    score: float
    # Tokens generated, an end-of-sequence token that ended the sample included; 0: the
    # server did not count them.
    num_tokens: int
    # "eos", "stop" (a stop string), "length"; "": not said.
    finish_reason: str


class Generation(NamedTuple):
    """`GenerateCounted`'s answer: the samples, best score first, and the prompt's tokens."""

    completions: list[Completion]
    # Tokens of the prompt as the model saw it; 0: not counted.
    prompt_tokens: int


class StreamUpdate(NamedTuple):
    """One streamed item with the model server's counts (`GenerateStreamCounted`)."""

    text: str
    prefix_len: int
    scores: list[float]
    # Tokens generated so far; 0: not counted.
    num_tokens: int
    # Set on the sample's last update: "eos", "stop" or "length".
    finish_reason: str


#: GenerateStreamCounted's callback: callback(last, updates, prompt_tokens).
CountedStreamCallback = Callable[[bool, list[StreamUpdate], int], None]

_RETRIED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
)
_T = TypeVar("_T")


def merge_stream_items(
    texts: list[str], items: Sequence[StreamItem] | Sequence[StreamUpdate]
) -> list[str]:
    """Applies one GenerateStream response to the texts so far, one per sample.

    Sample i becomes texts[i][:prefix_len] + text; `texts` grows as samples appear. Returns it.
    """
    for i, item in enumerate(items):
        text, prefix_len = item[0], item[1]
        while len(texts) <= i:
            texts.append("")
        texts[i] = texts[i][:prefix_len] + text
    return texts


def _stream_updates(response: lm_pb2.GenerateStreamResponse) -> list[StreamUpdate]:
    return [
        StreamUpdate(
            item.text, item.prefix_len, list(item.scores), item.num_tokens, item.finish_reason
        )
        for item in response.items
    ]


class LanguageModel:
    """The LM methods of a published model; get one with `sax.Model(id).LM()`."""

    def __init__(self, name: ModelName, options: Options | None = None) -> None:
        self._name = name
        self._options = options or Options()

    @property
    def model_id(self) -> str:
        """The model's full id, e.g. "/sax/test/tiny"."""
        return self._name.full

    def Generate(self, text: str, options: ModelOptions | None = None) -> list[tuple[str, float]]:
        """Generates texts for the prompt: [(text, score), ...], best score first."""
        return [(c.text, c.score) for c in self.GenerateCounted(text, options).completions]

    def GenerateCounted(self, text: str, options: ModelOptions | None = None) -> Generation:
        """Like `Generate`, with the token counts and finish reasons the model server gives
        (what an OpenAI-style `usage` reports)."""
        request = lm_pb2.GenerateRequest(
            model_key=self._name.full, text=_text("text", text), extra_inputs=_extra(options)
        )

        def attempt(stub: lm_pb2_grpc.LMServiceStub, timeout: float) -> Generation:
            response = stub.Generate(request, timeout=timeout)
            completions = [
                Completion(t.text, t.score, t.num_tokens, t.finish_reason) for t in response.texts
            ]
            return Generation(completions, response.prompt_tokens)

        return self._run("Generate", attempt, _deadline(options))

    def Score(
        self, prefix: str, suffixes: Sequence[str], options: ModelOptions | None = None
    ) -> list[float]:
        """log p(suffix | prefix) for each suffix."""
        if isinstance(suffixes, str) or not all(isinstance(s, str) for s in suffixes):
            raise InvalidArgumentError(
                f"suffixes must be a list of strings, got {suffixes!r}; e.g. Score('Q: ', ['A'])"
            )
        request = lm_pb2.ScoreRequest(
            model_key=self._name.full,
            prefix=_text("prefix", prefix),
            suffix=list(suffixes),
            extra_inputs=_extra(options),
        )

        def attempt(stub: lm_pb2_grpc.LMServiceStub, timeout: float) -> list[float]:
            return list(stub.Score(request, timeout=timeout).logp)

        return self._run("Score", attempt, _deadline(options))

    def GenerateStream(
        self, text: str, callback: StreamCallback, options: ModelOptions | None = None
    ) -> None:
        """Generates and streams: blocks, calling `callback(False, items)` for each response
        (items: [(text, prefix_len, scores)] one per sample), then `callback(True, [])`.

        Errors before the first response are retried on another replica; later errors end the
        stream and are raised once the callbacks have stopped.
        """

        def counted(last: bool, updates: list[StreamUpdate], _prompt_tokens: int) -> None:
            callback(last, [(u.text, u.prefix_len, u.scores) for u in updates])

        self.GenerateStreamCounted(text, counted, options)

    def GenerateStreamCounted(
        self, text: str, callback: CountedStreamCallback, options: ModelOptions | None = None
    ) -> None:
        """Like `GenerateStream`, with counts: `callback(False, updates, prompt_tokens)` for
        each response, then `callback(True, [], prompt_tokens)`."""
        request = lm_pb2.GenerateRequest(
            model_key=self._name.full, text=_text("text", text), extra_inputs=_extra(options)
        )

        def attempt(
            stub: lm_pb2_grpc.LMServiceStub, timeout: float
        ) -> tuple[Any, lm_pb2.GenerateStreamResponse | None]:
            call = stub.GenerateStream(request, timeout=timeout)
            try:
                return call, next(call)
            except StopIteration:
                return call, None
            except BaseException:
                call.cancel()
                raise

        deadline = _deadline(options)
        call, first = self._run("GenerateStream", attempt, deadline)
        prompt_tokens = 0
        try:
            if first is not None:
                prompt_tokens = first.prompt_tokens
                callback(False, _stream_updates(first), prompt_tokens)
                for response in call:
                    prompt_tokens = response.prompt_tokens or prompt_tokens
                    callback(False, _stream_updates(response), prompt_tokens)
        except grpc.RpcError as e:
            raise self._error("GenerateStream", deadline, "", e) from None
        finally:
            call.cancel()
        callback(True, [], prompt_tokens)

    def _run(
        self,
        method: str,
        attempt: Callable[[lm_pb2_grpc.LMServiceStub, float], _T],
        deadline: retry.Deadline,
    ) -> _T:
        """Runs `attempt(stub, timeout)` on replicas in turn until it succeeds or must stop."""
        model = location.lookup(self._name)
        backoff = retry.Backoff()
        attempts = 0
        while True:
            address = model.pick(deadline)
            remaining = deadline.remaining()
            if remaining <= 0:
                raise DeadlineExceededError(
                    f"{method} on {self._name} ran out of time ({deadline.timeout:g}s) after "
                    f"{attempts} attempts; retry with a longer timeout"
                )
            attempts += 1
            stub = lm_pb2_grpc.LMServiceStub(channels.get_channel(address))
            try:
                return attempt(stub, remaining)
            except grpc.RpcError as e:
                if not self._retryable(e.code()) or deadline.expired():
                    raise self._error(method, deadline, address, e, attempts) from None
                last = e
                logger.debug("%s on %s at %s: %s; retrying", method, self._name, address, e.code())
            backoff.sleep(deadline)
            if deadline.expired():
                raise self._error(method, deadline, address, last, attempts)

    def _retryable(self, code: grpc.StatusCode) -> bool:
        if self._options.fail_fast:
            return code == grpc.StatusCode.NOT_FOUND
        return code in _RETRIED

    def _error(
        self,
        method: str,
        deadline: retry.Deadline,
        address: str,
        err: grpc.RpcError,
        attempts: int = 1,
    ) -> SaxError:
        at = f" at {address}" if address else ""
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(
                f"{method} on {self._name}{at} did not finish within {deadline.timeout:g}s; "
                "retry with a longer timeout (ModelOptions.SetTimeout or saxutil --sax_timeout)"
            )
        if attempts > 1:
            return error_for_code(
                err.code(),
                f"{method} on {self._name} failed after {attempts} attempts; last replica"
                f"{at}: {err.details()}",
            )
        return _from_rpc_error(err)


def _text(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _deadline(options: ModelOptions | None) -> retry.Deadline:
    return retry.Deadline(options.timeout_or_none() if options else None, DEFAULT_DATA_TIMEOUT)


def _extra(options: ModelOptions | None) -> common_pb2.ExtraInputs:
    return options.ToProto() if options is not None else common_pb2.ExtraInputs()
