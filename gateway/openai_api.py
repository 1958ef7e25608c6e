"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions.

Model names: "/sax/<cell>/<model>", or "<model>" for a model of the gateway's cell. Request
fields map to the model's extra inputs: `max_tokens` (or `max_completion_tokens`) ->
`per_example_max_decode_steps`, `temperature`, `top_p`, `seed` (+i for the i-th of `n`
completions; 0 draws a fresh seed, as on the model server) and `stop` (one string, or a JSON list
of several) -> the same names. A field the model's config does not declare is a 400, as is a
`max_tokens` above the model's MAX_DECODE_STEPS (the model server's INVALID_ARGUMENT, reworded).
`n` completions are n concurrent calls; a model returning several samples per call (NUM_SAMPLES > 1)
gives its best-scored one, or its first when streaming.

Chat prompts are the model's chat template rendered over the messages (`servables.chat_template`).
`top_k` (0: off), `repetition_penalty` (1: off) and `ignore_eos` (vLLM's extension: keep going
past end-of-sequence) map to the extra inputs of the same names, as does `speculative_tokens`
(this server's extension: draft tokens per step by prompt lookup, 0: none).

Token counts in `usage` and `finish_reason` are the model server's: the tokens the engine
generated (an end-of-sequence token that ended a sample included, as vLLM counts) and the
prompt's tokens as the model saw them; "length" when a sample used its decode steps, "stop" at
end-of-sequence or a stop string. A model server that does not count leaves the gateway to
estimate them by re-tokenizing with the checkpoint's tokenizer (no `usage` without one).

`stream: true` answers server-sent events, `data: {chunk}\\n\\n` in OpenAI's chunk format, ending
with `data: [DONE]`; with `stream_options.include_usage` a last chunk carries `usage`. An error
before the first token is an HTTP error; a later one is sent as a `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

import sax
from gateway.app_state import GatewayState
from gateway.calls import Call, Reservation, Streams
from gateway.catalog import MAX_DECODE_STEPS, ModelInfo
from gateway.http_errors import http_status, openai_error_body
from gateway.openai_schemas import ChatRequest, CompletionRequest, SamplingRequest
from sax.errors import InvalidArgumentError, SaxError
from servables.configs.llama import IGNORE_EOS
from servables.sampling_params import SPECULATIVE_TOKENS

logger = logging.getLogger(__name__)


class OpenAIError(InvalidArgumentError):
    """An InvalidArgumentError naming the request field at fault (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class _Job:
    """What one request asks of the cell."""

    model_id: str
    info: ModelInfo
    # One entry per choice, in choice order.
    calls: list[Call]
    # The prompt of each choice.
    prompts: list[str]
    # The distinct prompts, for usage.
    distinct_prompts: list[str]
    limit: int | None


def _options(
    state: GatewayState, info: ModelInfo, req: SamplingRequest, limit: int | None, i: int
) -> sax.ModelOptions:
    options = state.runner.options()
    declared = info.declared_extra_inputs()

    def check(key: str, field: str) -> None:
        if declared is not None and key not in declared:
            raise OpenAIError(
                f"{field} is not supported by model {info.model_id}: its config "
                f"{info.model_path} declares the extra inputs {', '.join(sorted(declared))}",
                field,
            )

    if limit is not None:
        check(MAX_DECODE_STEPS, "max_tokens")
        options.SetExtraInput(MAX_DECODE_STEPS, limit)
    if req.temperature is not None:
        check("temperature", "temperature")
        options.SetExtraInput("temperature", req.temperature)
    if req.top_p is not None:
        check("top_p", "top_p")
        options.SetExtraInput("top_p", req.top_p)
    if req.top_k is not None and req.top_k > 0:
        check("top_k", "top_k")
        options.SetExtraInput("top_k", req.top_k)
    if req.repetition_penalty is not None and req.repetition_penalty != 1.0:
        check("repetition_penalty", "repetition_penalty")
        options.SetExtraInput("repetition_penalty", req.repetition_penalty)
    if req.ignore_eos:
        check(IGNORE_EOS, "ignore_eos")
        options.SetExtraInput(IGNORE_EOS, 1)
    if req.speculative_tokens:
        check(SPECULATIVE_TOKENS, "speculative_tokens")
        options.SetExtraInput(SPECULATIVE_TOKENS, req.speculative_tokens)
    if req.seed is not None:
        check("seed", "seed")
        options.SetExtraInput("seed", req.seed + i)
    stops = req.stop_strings()
    if stops:
        check("stop", "stop")
        options.SetExtraInputString("stop", stops[0] if len(stops) == 1 else json.dumps(stops))
    return options


def _reword(err: SaxError, job: _Job) -> SaxError:
    """The model server's answer to a too-large max_tokens, in the request's terms."""
    if isinstance(err, InvalidArgumentError) and MAX_DECODE_STEPS in str(err):
        limit = job.info.max_decode_steps()
        most = f" (at most {limit})" if limit is not None else ""
        return OpenAIError(
            f"max_tokens {job.limit} is too large for model {job.model_id}{most}: {err}",
            "max_tokens",
        )
    return err


async def _model(state: GatewayState, req: SamplingRequest) -> ModelInfo:
    """The requested model's info; 404 if it is not published."""
    req.check_supported()
    model_id = state.catalog.resolve_name(req.model)
    return await state.runner.admin(state.catalog.get, model_id)


def _prepare(
    state: GatewayState,
    req: SamplingRequest,
    info: ModelInfo,
    prompts: Sequence[str],
    limit: int | None,
) -> _Job:
    model_id = info.model_id
    calls, choice_prompts = [], []
    for prompt in prompts:
        for i in range(req.n):
            calls.append(Call(prompt, _options(state, info, req, limit, i)))
            choice_prompts.append(prompt)
    return _Job(model_id, info, calls, choice_prompts, list(prompts), limit)


@dataclass(frozen=True)
class _Answer:
    """One call's text, with the model server's counts (0 / "": not given)."""

    text: str
    num_tokens: int = 0
    finish_reason: str = ""
    prompt_tokens: int = 0


def _finish(job: _Job, answer: _Answer) -> tuple[str, int | None]:
    """The OpenAI finish_reason and the completion's tokens: the model server's, or, from a
    server that does not count, estimated by re-tokenizing the text."""
    if answer.finish_reason:
        reason = "length" if answer.finish_reason == "length" else "stop"
        return reason, answer.num_tokens
    tokens = job.info.count_tokens(answer.text)
    cap = job.limit or job.info.default_max_tokens()
    reason = "length" if tokens is not None and cap is not None and tokens >= cap else "stop"
    return reason, tokens


def _usage(
    job: _Job, completion_tokens: Sequence[int | None], answers: Sequence[_Answer]
) -> dict[str, int] | None:
    counted = {}
    for prompt, answer in zip(job.prompts, answers, strict=True):
        if answer.prompt_tokens:
            counted.setdefault(prompt, answer.prompt_tokens)
    prompt_tokens = [counted.get(p) or job.info.count_tokens(p) for p in job.distinct_prompts]
    if any(t is None for t in (*prompt_tokens, *completion_tokens)):
        return None
    p = sum(t for t in prompt_tokens if t is not None)
    c = sum(t for t in completion_tokens if t is not None)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _generate_all(state: GatewayState, job: _Job) -> list[_Answer]:
    """The best answer of each call; the first error once every call has ended (so the call
    slots are held exactly as long as the calls run)."""
    with state.runner.reserve(len(job.calls)) as reservation:
        results = await asyncio.gather(
            *(state.runner.generate(job.model_id, call, reservation) for call in job.calls),
            return_exceptions=True,
        )
    answers = []
    for result in results:
        if isinstance(result, SaxError):
            raise _reword(result, job)
        if isinstance(result, BaseException):
            raise result
        if not result.completions:
            answers.append(_Answer(""))
            continue
        best = result.completions[0]
        answers.append(
            _Answer(best.text, best.num_tokens, best.finish_reason, result.prompt_tokens)
        )
    return answers


class _EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs once the response ends, however it ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _open(state: GatewayState, job: _Job) -> tuple[Streams, Reservation]:
    reservation = state.runner.reserve(len(job.calls))
    try:
        streams = await state.runner.open_streams(job.model_id, job.calls, reservation)
    except SaxError as e:
        reservation.release()
        raise _reword(e, job) from None
    except BaseException:
        reservation.release()
        raise
    return streams, reservation


async def _stream(
    state: GatewayState,
    job: _Job,
    chunk: Callable[[int, str | None, str | None], dict[str, Any]],
    usage_chunk: Callable[[dict[str, int] | None], dict[str, Any]] | None,
    start: Callable[[int], dict[str, Any]] | None = None,
) -> _EventStream:
    """Streams the job: `chunk(index, delta, finish_reason)` builds each event."""
    streams, reservation = await _open(state, job)

    def close() -> None:
        streams.close()
        reservation.release()

    async def events() -> AsyncIterator[str]:
        sent = [""] * len(job.calls)
        tokens: list[int | None] = [None] * len(job.calls)
        answers = [_Answer("")] * len(job.calls)
        if start is not None:
            for i in range(len(job.calls)):
                yield _sse(start(i))
        try:
            async for event in streams:
                i, text = event.index, event.text
                if text.startswith(sent[i]):
                    delta = text[len(sent[i]) :]
                else:  # the model server never rewrites streamed text; keep what was sent
                    logger.warning(
                        "stream %d of %s rewrote its text; kept the sent part", i, job.model_id
                    )
                    delta = ""
                if delta:
                    sent[i] += delta
                    yield _sse(chunk(i, delta, None))
                if event.done:
                    answers[i] = _Answer(
                        sent[i], event.num_tokens, event.finish_reason, event.prompt_tokens
                    )
                    reason, tokens[i] = _finish(job, answers[i])
                    yield _sse(chunk(i, None, reason))
        except SaxError as e:
            err = _reword(e, job)
            yield _sse(openai_error_body(http_status(err), str(err), err.code.name.lower()))
        else:
            if usage_chunk is not None:
                yield _sse(usage_chunk(_usage(job, tokens, answers)))
        yield "data: [DONE]\n\n"

    return _EventStream(events(), close)


def router() -> APIRouter:
    """The /v1 routes; they use the `GatewayState` in `app.state.gateway`."""
    r = APIRouter(prefix="/v1")

    def state(request: Request) -> GatewayState:
        return request.app.state.gateway

    @r.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        s = state(request)
        ids = await s.runner.admin(
            sax.ListAll, s.settings.sax_cell, timeout=s.settings.admin_timeout
        )
        return {"object": "list", "data": [_model_card(m) for m in ids]}

    @r.get("/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        s = state(request)
        info = await s.runner.admin(s.catalog.get, s.catalog.resolve_name(model))
        return _model_card(info.model_id)

    @r.post("/completions", response_model=None)
    async def completions(
        req: CompletionRequest, request: Request
    ) -> dict[str, Any] | _EventStream:
        s = state(request)
        info = await _model(s, req)
        job = _prepare(s, req, info, req.prompts(), req.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def body(
            choices: list[dict[str, Any]], usage: Any = None, with_usage: bool = True
        ) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "choices": choices,
            }
            if with_usage:
                out["usage"] = usage
            return out

        if req.stream:
            include = req.wants_usage_chunk()

            def chunk(i: int, delta: str | None, reason: str | None) -> dict[str, Any]:
                text = delta or ""
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                return body([choice], None, include)

            def start(i: int) -> dict[str, Any]:
                return chunk(i, job.prompts[i], None)

            return await _stream(
                s,
                job,
                chunk,
                (lambda usage: body([], usage)) if include else None,
                start if req.echo else None,
            )

        answers = await _generate_all(s, job)
        choices, counts = [], []
        for i, answer in enumerate(answers):
            reason, tokens = _finish(job, answer)
            counts.append(tokens)
            shown = job.prompts[i] + answer.text if req.echo else answer.text
            choices.append({"index": i, "text": shown, "logprobs": None, "finish_reason": reason})
        usage = _usage(job, counts, answers)
        out = body(choices, usage)
        if usage is None:
            del out["usage"]
        return out

    @r.post("/chat/completions", response_model=None)
    async def chat(req: ChatRequest, request: Request) -> dict[str, Any] | _EventStream:
        s = state(request)
        info = await _model(s, req)
        prompt = info.chat_template.render([m.as_template_input() for m in req.messages])
        job = _prepare(s, req, info, [prompt], req.token_limit())
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def body(obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": req.model,
                "choices": choices,
            }

        if req.stream:
            include = req.wants_usage_chunk()

            def chunk_of(choice: dict[str, Any]) -> dict[str, Any]:
                out = body("chat.completion.chunk", [choice])
                if include:
                    out["usage"] = None
                return out

            def start(i: int) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""}
                return chunk_of(
                    {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                )

            def chunk(i: int, delta: str | None, reason: str | None) -> dict[str, Any]:
                d = {"content": delta} if delta is not None else {}
                return chunk_of({"index": i, "delta": d, "logprobs": None, "finish_reason": reason})

            def usage_chunk(usage: dict[str, int] | None) -> dict[str, Any]:
                return {**body("chat.completion.chunk", []), "usage": usage}

            return await _stream(s, job, chunk, usage_chunk if include else None, start)

        answers = await _generate_all(s, job)
        choices, counts = [], []
        for i, answer in enumerate(answers):
            reason, tokens = _finish(job, answer)
            counts.append(tokens)
            message = {"role": "assistant", "content": answer.text}
            choices.append(
                {"index": i, "message": message, "logprobs": None, "finish_reason": reason}
            )
        out = body("chat.completion", choices)
        usage = _usage(job, counts, answers)
        if usage is not None:
            out["usage"] = usage
        return out

    return r


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "sax"}
