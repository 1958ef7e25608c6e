"""The LM service (Generate, GenerateStream, Score) -> the loaded model's `Servable`.

Every call hands the servable its deadline and a cancel event (`SamplingParams.for_call`); the
event is set when the call ends for any reason (client cancel, deadline, server stop), so work
nobody waits for stops. A servable that implements `AsyncServable` (the batching engine) is
awaited on the event loop and cancelled with its coroutine. Any other servable's compute runs in
a thread pool, never on the event loop: a streamed generation runs in one worker thread that
hands each step to the event loop; when the call ends the worker stops at the next step and
closes the servable's iterator.

`CallTracker` counts the calls in flight (what a graceful drain waits for), refuses new calls with
UNAVAILABLE once the server drains, and feeds the call metrics (`model_server.metrics`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc

from model_server.metrics import ModelServerMetrics
from model_server.model_manager import LoadedModel, ModelManager
from model_server.servable import AsyncServable, Generated, StreamItem
from sax.errors import InvalidArgumentError, SaxError, UnavailableError
from sax.rpc import handle_errors
from sax.v1 import lm_pb2, lm_pb2_grpc
from servables.sampling_params import SamplingParams

T = TypeVar("T")
logger = logging.getLogger(__name__)

_ITEM, _ERROR, _DONE = range(3)


def _check_method(model: LoadedModel, method: str) -> None:
    if method not in model.method_names:
        raise InvalidArgumentError(
            f"model {model.model_key} does not serve {method}; it serves: "
            f"{', '.join(model.method_names)}"
        )


async def iterate_in_thread(
    make: Callable[[], Iterator[T]], executor: Executor
) -> AsyncIterator[T]:
    """Runs `make()` and iterates it in one executor thread, yielding its items on the loop.

    Leaving the `async for` early (break, cancel) stops the thread after its current item, closes
    the iterator, and waits for the thread before returning.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    stop = threading.Event()

    def put(kind: int, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening
            stop.set()

    def work() -> None:
        it: Iterator[T] | None = None
        try:
            it = make()
            for item in it:
                if stop.is_set():
                    break
                put(_ITEM, item)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            put(_ERROR, e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            put(_DONE, None)

    worker = loop.run_in_executor(executor, work)
    try:
        while True:
            kind, value = await queue.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        stop.set()
        await asyncio.wait({worker})


def _call_params(
    model: LoadedModel, request: Any, context: grpc.aio.ServicerContext
) -> SamplingParams:
    """The request's checked params with the call's deadline and a fresh cancel event."""
    params = SamplingParams.from_extra_inputs(request.extra_inputs, model.config)
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    return params.for_call(deadline, threading.Event())


def _cancel(params: SamplingParams) -> None:
    if params.cancel is not None:
        params.cancel.set()


class _Call:
    """Timing of one call in flight (stream items for the token metrics)."""

    def __init__(self, method: str, metrics: ModelServerMetrics | None) -> None:
        self.method = method
        self.started = time.monotonic()
        self._last_item: float | None = None
        self._metrics = metrics

    def item(self) -> None:
        """Records that a stream item went out."""
        now = time.monotonic()
        if self._metrics is not None:
            if self._last_item is None:
                self._metrics.time_to_first_token.labels(self.method).observe(now - self.started)
            else:
                self._metrics.time_per_output_token.labels(self.method).observe(
                    now - self._last_item
                )
        self._last_item = now


def _drain_error() -> UnavailableError:
    return UnavailableError(
        "this model server is draining (shutting down); retry on another replica"
    )


class CallTracker:
    """The LM calls in flight: counted, refused while draining, measured. Used on the server's
    event loop."""

    def __init__(self, metrics: ModelServerMetrics | None = None) -> None:
        self.metrics = metrics
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def drain(self) -> None:
        """Refuses every new call with UNAVAILABLE from now on."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Waits up to timeout seconds for the calls in flight to end; True when none is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return self.in_flight == 0
        return True

    @asynccontextmanager
    async def call(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[_Call]:
        """Wraps one call: UNAVAILABLE when draining; counts it and records its status code."""
        call = _Call(method, self.metrics)
        code = "OK"
        counted = False
        try:
            if self.draining:
                raise _drain_error()
            self.in_flight += 1
            self._idle.clear()
            counted = True
            yield call
        except SaxError as e:
            code = e.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            if counted:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()
            if self.metrics is not None:
                self.metrics.observe_call(method, code, time.monotonic() - call.started)


class LMServicer(lm_pb2_grpc.LMServiceServicer):
    """Adapter from the LM protos to the servables of a `ModelManager`."""

    def __init__(
        self, manager: ModelManager, executor: Executor, calls: CallTracker | None = None
    ) -> None:
        """`calls` tracks the calls (drain, metrics); a private one when not given."""
        self._manager = manager
        self._executor = executor
        self.calls = calls or CallTracker()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    @handle_errors
    async def Generate(
        self, request: lm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> lm_pb2.GenerateResponse:
        async with (
            self.calls.call("Generate", context),
            self._manager.use(request.model_key) as model,
        ):
            _check_method(model, "lm.generate")
            params = _call_params(model, request, context)
            servable = model.servable
            try:
                if isinstance(servable, AsyncServable):
                    results = await servable.generate_async(request.text, params)
                else:
                    results = await self._run(servable.generate, request.text, params)
            finally:
                _cancel(params)
        rows = [Generated(*r) for r in results]
        return lm_pb2.GenerateResponse(
            texts=[
                lm_pb2.DecodedText(
                    text=r.text,
                    score=r.score,
                    num_tokens=r.num_tokens,
                    finish_reason=r.finish_reason,
                )
                for r in rows
            ],
            prompt_tokens=rows[0].prompt_tokens if rows else 0,
        )

    @handle_errors
    async def GenerateStream(
        self, request: lm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[lm_pb2.GenerateStreamResponse]:
        async with (
            self.calls.call("GenerateStream", context) as call,
            self._manager.use(request.model_key) as model,
        ):
            _check_method(model, "lm.generate_stream")
            params = _call_params(model, request, context)
            servable = model.servable
            steps: AsyncIterator[list[StreamItem]]
            if isinstance(servable, AsyncServable):
                steps = servable.generate_stream_async(request.text, params)
            else:
                make = functools.partial(servable.generate_stream, request.text, params)
                steps = iterate_in_thread(make, self._executor)
            try:
                async for step in steps:
                    call.item()
                    yield lm_pb2.GenerateStreamResponse(
                        items=[
                            lm_pb2.GenerateStreamItem(
                                text=item.text,
                                prefix_len=item.prefix_len,
                                scores=item.scores,
                                num_tokens=item.num_tokens,
                                finish_reason=item.finish_reason,
                            )
                            for item in step
                        ],
                        prompt_tokens=step[0].prompt_tokens if step else 0,
                    )
            finally:
                _cancel(params)
                aclose = getattr(steps, "aclose", None)
                if aclose is not None:
                    await aclose()

    @handle_errors
    async def Score(
        self, request: lm_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> lm_pb2.ScoreResponse:
        async with self.calls.call("Score", context):
            if not request.suffix:
                raise InvalidArgumentError("Score needs at least one suffix")
            async with self._manager.use(request.model_key) as model:
                _check_method(model, "lm.score")
                params = _call_params(model, request, context)
                servable = model.servable
                suffixes = list(request.suffix)
                try:
                    if isinstance(servable, AsyncServable):
                        logp = await servable.score_async(request.prefix, suffixes, params)
                    else:
                        logp = await self._run(servable.score, request.prefix, suffixes, params)
                finally:
                    _cancel(params)
        return lm_pb2.ScoreResponse(logp=logp)
