"""Runs the blocking `sax` client calls off the event loop, within the gateway's limits.

Generate and GenerateStream calls run in one thread pool of `max_concurrent_calls` threads;
`CallRunner.reserve(n)` takes n call slots at once or answers RESOURCE_EXHAUSTED (HTTP 429), so
the pool never queues. Admin calls (publish, list, model lookups, health) run in a separate small
pool, so that a busy cell never starves them.

A stream runs `LanguageModel.GenerateStream` in a pool thread whose callback hands each update to
the event loop through an asyncio queue. Closing the `Streams` (the HTTP client went away, or
the answer is complete) makes the next callback raise, which cancels the gRPC call; a call still
waiting for its first token ends at its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import sax
from sax.errors import InternalError, ResourceExhaustedError
from sax.lm import Generation, StreamUpdate

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_ADMIN_THREADS = 16


class _StoppedError(Exception):
    """Raised in a stream callback to end a GenerateStream nobody reads any more."""


@dataclass(frozen=True)
class Call:
    """One Generate call: the prompt and its options (extra inputs, timeout)."""

    prompt: str
    options: sax.ModelOptions


@dataclass(frozen=True)
class StreamEvent:
    """An update of stream `index`: its first sample's whole text so far, or its end, with
    the model server's counts (0 / "": not given)."""

    index: int
    text: str
    done: bool = False
    # Tokens the first sample has generated so far.
    num_tokens: int = 0
    # Why the first sample ended ("eos", "stop", "length"), once it has.
    finish_reason: str = ""
    # Tokens of the prompt.
    prompt_tokens: int = 0


# What a stream thread hands the reader: an event, or the error that ended the stream.
_Item = tuple[StreamEvent, BaseException | None]


class Reservation:
    """Call slots held until `release()` (idempotent); a context manager.

    A call started with the reservation claims one slot, which then goes back only when the
    call's worker thread is done: a client that disconnects cannot free slots whose blocking
    calls still run, so the limit keeps counting them."""

    def __init__(self, runner: CallRunner, n: int) -> None:
        self._runner = runner
        self._n = n
        self._lock = threading.Lock()

    def claim(self) -> Callable[[Any], None]:
        """Takes one slot for a worker; the returned callback (for Future.add_done_callback)
        gives it back."""
        with self._lock:
            if self._n <= 0:
                raise InternalError("more calls started than call slots reserved")
            self._n -= 1
        return lambda _future: self._runner._release(1)

    def release(self) -> None:
        """Gives back the slots no call has claimed."""
        with self._lock:
            n, self._n = self._n, 0
        if n:
            self._runner._release(n)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CallRunner:
    """The gateway's thread pools and call-slot accounting (used from one event loop)."""

    def __init__(self, max_concurrent_calls: int, timeout: float) -> None:
        self._limit = max_concurrent_calls
        self._timeout = timeout
        self._in_flight = 0
        self._lock = threading.Lock()
        self._calls = ThreadPoolExecutor(max_concurrent_calls, thread_name_prefix="gateway-call")
        self._admin = ThreadPoolExecutor(_ADMIN_THREADS, thread_name_prefix="gateway-admin")

    @property
    def in_flight(self) -> int:
        """Call slots held now."""
        return self._in_flight

    def options(self) -> sax.ModelOptions:
        """New call options carrying the gateway's call timeout."""
        options = sax.ModelOptions()
        options.SetTimeout(self._timeout)
        return options

    def reserve(self, n: int) -> Reservation:
        """Takes n call slots; ResourceExhaustedError when fewer are free."""
        with self._lock:
            if self._in_flight + n > self._limit:
                raise ResourceExhaustedError(
                    f"the gateway is at its limit of {self._limit} concurrent calls "
                    f"({self._in_flight} running, {n} asked); retry later"
                )
            self._in_flight += n
        return Reservation(self, n)

    def _release(self, n: int) -> None:
        with self._lock:
            self._in_flight -= n

    async def admin(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Runs a blocking admin-side function in the admin pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._admin, functools.partial(fn, *args, **kwargs))

    async def generate(self, model_id: str, call: Call, reservation: Reservation) -> Generation:
        """Generate on the cell (with the server's token counts), on a slot of
        `reservation`."""
        lm = sax.Model(model_id).LM()
        release = reservation.claim()
        future = self._calls.submit(lm.GenerateCounted, call.prompt, call.options)
        future.add_done_callback(release)
        return await asyncio.wrap_future(future)

    async def open_streams(
        self, model_id: str, calls: Sequence[Call], reservation: Reservation
    ) -> Streams:
        """Starts one GenerateStream per call and waits for each one's first update, so that
        an error before any text (unknown model, bad input) is raised here (slots must be
        reserved). Iterate the result for the updates; close it when done."""
        streams = Streams(asyncio.get_running_loop(), len(calls))
        lm = sax.Model(model_id).LM()
        for index, call in enumerate(calls):
            release = reservation.claim()
            future = self._calls.submit(streams._run, lm, index, call)
            future.add_done_callback(_log_unexpected)
            future.add_done_callback(release)
        try:
            await streams._wait_first()
        except BaseException:
            streams.close()
            raise
        return streams

    def shutdown(self) -> None:
        """Stops the pools (running calls finish by their deadlines)."""
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._admin.shutdown(wait=False, cancel_futures=True)


def _log_unexpected(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("stream thread failed: %r", future.exception())


class Streams:
    """The updates of n concurrent streams, as an async iterator of `StreamEvent`s. Errors of a
    stream are raised from the iteration; `close()` stops every stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._stop = threading.Event()
        self._n = n
        self._buffered: list[_Item] = []
        self._open = n

    def _put(self, item: _Item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self, lm: sax.LanguageModel, index: int, call: Call) -> None:
        texts: list[str] = []
        now = StreamEvent(index, "")

        def callback(last: bool, updates: list[StreamUpdate], prompt_tokens: int) -> None:
            nonlocal now
            if self._stop.is_set():
                raise _StoppedError
            if last:
                return
            sax.lm.merge_stream_items(texts, updates)
            first = updates[0] if updates else None
            now = StreamEvent(
                index,
                texts[0] if texts else "",
                num_tokens=first.num_tokens if first else now.num_tokens,
                finish_reason=(first.finish_reason if first else "") or now.finish_reason,
                prompt_tokens=prompt_tokens,
            )
            self._put((now, None))

        try:
            lm.GenerateStreamCounted(call.prompt, callback, call.options)
        except _StoppedError:
            logger.debug("stream %d of %s stopped by the gateway", index, lm.model_id)
            return
        except Exception as e:  # noqa: BLE001 - handed to the reader, who raises it
            self._put((StreamEvent(index, "", done=True), e))
            return
        self._put((dataclasses.replace(now, done=True), None))

    async def _wait_first(self) -> None:
        seen: set[int] = set()
        while len(seen) < self._n:
            item = await self._queue.get()
            if item[1] is not None:
                raise item[1]
            seen.add(item[0].index)
            self._buffered.append(item)

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        buffered, self._buffered = self._buffered, []
        for item in buffered:
            yield self._event(item)
        while self._open > 0:
            item = await self._queue.get()
            if item[1] is not None:
                raise item[1]
            yield self._event(item)

    def _event(self, item: _Item) -> StreamEvent:
        if item[0].done:
            self._open -= 1
        return item[0]

    def close(self) -> None:
        """Stops every stream still running (idempotent)."""
        self._stop.set()
