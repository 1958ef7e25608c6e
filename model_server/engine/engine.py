"""The engine core: one thread that owns the runner and loops schedule -> run -> update ->
fan-out. Backend-free: the runner samples and hands back token ids and log-probabilities.

Callers (any thread) `submit` a `Request` with a sink and get `RequestOutput`s on it, from the
engine thread, after every step that changed their request; `abort` drops a request before the
next step. Score requests run on the same thread, between decode steps, in borrowed blocks.
`close` stops the thread and fails what is still pending with UNAVAILABLE.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from model_server.engine.detokenizer import Detokenizer
from model_server.engine.request import (
    FinishReason,
    OutputSink,
    Request,
    RequestKind,
    RequestOutput,
    SampleOutput,
)
from model_server.engine.runner import Runner
from model_server.engine.scheduler import SampleKey, Scheduler, SchedulerOutput
from sax.errors import InternalError, SaxError, UnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load."""

    steps: int
    waiting: int
    running: int
    # Sequences that may still start, and the most that run at once.
    free_slots: int
    slots: int = 0
    # Tokens sampled since the engine started (every sample of every request).
    tokens: int = 0
    # time.monotonic() of the last completed step, or of the submit that ended an idle period:
    # with requests waiting or running, now minus this is how long the engine has made no
    # progress.
    last_progress: float = 0.0
    # KV cache blocks in all and free now (cached prefixes count as free: they are evictable).
    blocks: int = 0
    free_blocks: int = 0
    # Prompt tokens looked up in the prefix cache and found there, since the engine started.
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    # Requests preempted (their blocks taken back, resumed later) since the engine started.
    preemptions: int = 0
    # Draft tokens of speculating samples checked by the model, and those it agreed with.
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class _Active:
    """Engine-side state of a request."""

    request: Request
    sink: OutputSink
    detoks: list[Detokenizer] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)  # characters sent per sample
    counts: list[int] = field(default_factory=list)  # tokens generated per sample, EOS included

    def out(self, **kwargs: object) -> RequestOutput:
        return RequestOutput(self.request.request_id, **kwargs)  # type: ignore[arg-type]


def _shutdown_error() -> UnavailableError:
    return UnavailableError(
        "the model is being unloaded or the server is shutting down; retry on another replica"
    )


class Engine:
    """Continuous batching over a runner's KV cache blocks, on its own thread."""

    def __init__(
        self,
        runner: Runner,
        *,
        decode: Callable[[Sequence[int]], str],
        eos_ids: Collection[int],
        max_queue: int,
        max_batch_size: int,
        token_budget: int | None = None,
        prefix_caching: bool = True,
        name: str = "engine",
    ) -> None:
        """`decode` turns token ids into text (the tokenizer's); a sample ends at any of
        `eos_ids`. Decode batches hold at most `max_batch_size` samples; a step runs at most
        `token_budget` tokens (None: no limit), prompts in chunks when the runner can, after
        the longest cached prefix of theirs with `prefix_caching`."""
        self._runner = runner
        self._decode = decode
        self._eos = frozenset(eos_ids)
        self._scheduler = Scheduler(
            runner.num_slots,
            runner.max_seq_len,
            max_queue=max_queue,
            max_batch_size=max_batch_size,
            token_budget=token_budget,
            chunked_prefill=runner.chunked_prefill,
            block_size=runner.block_size,
            num_blocks=runner.num_blocks,
            prefix_caching=prefix_caching,
            speculation=runner.chunked_prefill,
        )
        self._cond = threading.Condition()
        self._active: dict[int, _Active] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self._tokens = 0
        self._drafted = 0
        self._accepted = 0
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def new_request_id(self) -> int:
        """A request id unused by this engine."""
        with self._cond:
            return next(self._ids)

    def submit(self, request: Request, sink: OutputSink) -> None:
        """Queues a request; its outputs go to `sink` on the engine thread. RESOURCE_EXHAUSTED
        when the queue is full, UNAVAILABLE once the engine is closing."""
        active = _Active(request, sink)
        if request.kind is RequestKind.GENERATE:
            n = len(request.samples)
            active.detoks = [
                Detokenizer(self._decode, request.prompt, request.stop) for _ in range(n)
            ]
            active.scores = [0.0] * n
            active.emitted = [0] * n
            active.counts = [0] * n
        with self._cond:
            if self._closing:
                raise _shutdown_error()
            if not self._scheduler.has_work():
                self._last_progress = time.monotonic()  # idle time is not a stall
            self._scheduler.add(request)
            self._active[request.request_id] = active
            self._cond.notify()

    def abort(self, request_id: int, error: SaxError) -> None:
        """Drops a request before the next step (its blocks are freed then); its sink gets one
        last output carrying `error`. No-op when the request is already done."""
        with self._cond:
            if self._scheduler.abort(request_id, error):
                self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            s = self._scheduler
            blocks = s.pool.stats()
            return EngineStats(
                s.step,
                s.num_waiting,
                s.num_running,
                s.num_free_slots,
                slots=s.max_seqs,
                tokens=self._tokens,
                last_progress=self._last_progress,
                blocks=s.pool.num_blocks,
                free_blocks=s.pool.num_free,
                prefix_queried_tokens=blocks.queried_tokens,
                prefix_hit_tokens=blocks.hit_tokens,
                preemptions=s.preemptions,
                draft_tokens=self._drafted,
                accepted_tokens=self._accepted,
            )

    def close(self, timeout: float = 60.0) -> bool:
        """Stops the engine thread after its current step; pending requests fail with
        UNAVAILABLE. Idempotent. Returns whether the thread has stopped (the runner may only be
        freed then)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine thread still running %.0fs after close", timeout)
                return False
        return True

    # The engine thread.

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._scheduler.has_work():
                        self._cond.wait()
                    if self._closing:
                        return
                    output = self._scheduler.schedule(time.monotonic())
                    aborted = [(self._active.pop(a.request_id, None), a) for a in output.aborted]
                for active, a in aborted:
                    if active is not None:
                        self._deliver(active, active.out(finished=True, error=a.error))
                self._step(output)
        except BaseException:
            logger.exception("the engine thread failed; failing its requests")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._scheduler.drain()
            actives, self._active = list(self._active.values()), {}
        for active in actives:
            self._deliver(active, active.out(finished=True, error=_shutdown_error()))

    def _deliver(self, active: _Active, output: RequestOutput) -> None:
        try:
            active.sink(output)
        except Exception:
            logger.exception("output of request %d could not be delivered", output.request_id)
            if not output.finished:
                self.abort(output.request_id, InternalError("the caller's output sink failed"))

    def _step(self, output: SchedulerOutput) -> None:
        try:
            ran = self._runner.execute(output)
            logp = ran.scores
            keys, tokens, token_logp = ran.keys, ran.tokens, ran.logprobs
        except Exception as e:
            logger.exception("engine step %d failed", output.step)
            error = InternalError(f"the model failed while running the request ({e!r}); retry")
            with self._cond:
                for request_id in output.request_ids():
                    self._scheduler.abort(request_id, error)
                self._scheduler.update(output, {}, {})
            return
        pieces: dict[SampleKey, str] = {}
        ended: dict[SampleKey, FinishReason] = {}
        # A verified draft gives a sample several tokens in a row: those up to one that ends it.
        kept: dict[SampleKey, list[int]] = {}
        for key, token, lp in zip(keys, tokens, token_logp, strict=True):
            if key in ended:
                continue
            kept.setdefault(key, []).append(token)
            active = self._active[key[0]]
            active.counts[key[1]] += 1
            if token in self._eos and not active.request.ignore_eos:
                ended[key] = FinishReason.EOS
                continue
            active.scores[key[1]] += lp
            detok = active.detoks[key[1]]
            pieces[key] = pieces.get(key, "") + detok.add(token)
            if detok.stopped:
                ended[key] = FinishReason.STOP
        with self._cond:
            result = self._scheduler.update(output, kept, ended)
            done = {rid: self._active.pop(rid) for rid in result.done}
            self._tokens += sum(len(t) for t in kept.values())
            for v in output.verifies:
                self._drafted += len(v.draft)
                self._accepted += max(len(kept.get(v.key, ())) - 1, 0)
            self._last_progress = time.monotonic()
        reasons: dict[SampleKey, FinishReason] = {}
        for f in result.finished:
            reasons[f.key] = f.reason
            if f.reason is not FinishReason.STOP:
                active = done.get(f.key[0]) or self._active[f.key[0]]
                pieces[f.key] = pieces.get(f.key, "") + active.detoks[f.key[1]].flush()
        for request_id in output.request_ids():
            active = done.get(request_id) or self._active.get(request_id)
            if active is None:
                continue
            if active.request.kind is RequestKind.SCORE:
                if request_id in done:
                    self._deliver(active, active.out(logp=logp[request_id], finished=True))
                continue
            items = []
            for i in range(len(active.request.samples)):
                piece = pieces.get((request_id, i), "")
                items.append(
                    SampleOutput(
                        i,
                        piece,
                        active.emitted[i],
                        active.scores[i],
                        reasons.get((request_id, i)),
                        active.counts[i],
                    )
                )
                active.emitted[i] += len(piece)
            changed = any(item.text or item.finish_reason for item in items)
            if changed or request_id in done:
                self._deliver(active, active.out(samples=tuple(items), finished=request_id in done))
