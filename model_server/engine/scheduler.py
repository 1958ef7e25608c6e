"""Continuous batching, in pure Python (no torch, no device).

Each engine step asks the scheduler what to run (`schedule`), runs it, and reports the sampled
tokens back (`update`). A step first drops the requests that were aborted, cancelled or have
passed their deadline (freeing their slots). It then schedules one decode row for every running
sample (in batches of at most `max_batch_size`): decodes are never held back by prompts. The
rest of the step's token budget (`token_budget`, vLLM's `max_num_batched_tokens`) goes to
prompts: first the rest of the prompts already being prefilled, then waiting requests in
arrival order while enough KV cache slots are free (a GENERATE request needs one slot per
sample, a SCORE request one slot for the step). With `chunked_prefill` a prompt longer than
what is left of the budget is split over several steps (its first token is sampled at the end
of its last chunk); without it a prompt runs whole, alone when it exceeds the budget. Several
prompts share a step when they fit. Prompts get at least a quarter of the budget per step, so
they progress while many samples decode.

Samples that finish (EOS or stop string, decided by the engine; decode steps or slot length,
decided here) free their slot at once, so a new request can take it on the next step.

The scheduler is not thread-safe; the engine calls it under its lock.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass

from model_server.engine.kv_cache import SlotAllocator
from model_server.engine.request import FinishReason, Request, RequestKind, SampleOptions
from sax.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    SaxError,
)

# (request_id, sample index)
SampleKey = tuple[int, int]


@dataclass(frozen=True)
class PrefillWork:
    """Run prompt positions [start, end) of a GENERATE request in `slots[0]` (positions before
    `start` are already in its KV cache). On the last chunk (`final`), copy the prompt's K/V to
    the other slots and sample the first token of every sample from the last position."""

    request_id: int
    # The whole prompt.
    tokens: tuple[int, ...]
    # One slot per sample, in sample order.
    slots: tuple[int, ...]
    # How each sample picks its tokens, in sample order.
    samples: tuple[SampleOptions, ...] = ()
    # The chunk: prompt positions [start, stop); stop None: to the end of the prompt.
    start: int = 0
    stop: int | None = None

    @property
    def end(self) -> int:
        """The chunk's end position."""
        return len(self.tokens) if self.stop is None else self.stop

    @property
    def chunk(self) -> tuple[int, ...]:
        """The chunk's tokens."""
        return self.tokens[self.start : self.end]

    @property
    def final(self) -> bool:
        """Whether the chunk ends the prompt (its samples' first tokens are sampled)."""
        return self.end == len(self.tokens)


@dataclass(frozen=True)
class ScoreWork:
    """Run prefix + each suffix in `slot` and sum the suffix tokens' log-probabilities."""

    request_id: int
    slot: int
    prefix: tuple[int, ...]
    suffixes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class DecodeBatch:
    """One runner decode call: token i goes to position positions[i] of slot slots[i]."""

    keys: tuple[SampleKey, ...]
    slots: tuple[int, ...]
    tokens: tuple[int, ...]
    positions: tuple[int, ...]


@dataclass(frozen=True)
class Aborted:
    """A request dropped this step (its slots are free again); tell its caller `error`."""

    request_id: int
    error: SaxError


@dataclass(frozen=True)
class SchedulerOutput:
    """The work of one engine step, in the order to run it."""

    step: int
    aborted: tuple[Aborted, ...] = ()
    scores: tuple[ScoreWork, ...] = ()
    prefills: tuple[PrefillWork, ...] = ()
    decodes: tuple[DecodeBatch, ...] = ()
    # Samples that ended (finished, aborted) since the previous step: the runner drops their
    # sampler state.
    released: tuple[SampleKey, ...] = ()

    def request_ids(self) -> set[int]:
        """Requests that run in this step."""
        ids = {w.request_id for w in self.scores} | {w.request_id for w in self.prefills}
        return ids | {key[0] for batch in self.decodes for key in batch.keys}


@dataclass(frozen=True)
class Finished:
    """A sample that finished in the step; its slot is free again."""

    key: SampleKey
    reason: FinishReason


@dataclass(frozen=True)
class UpdateResult:
    """What a step's update changed."""

    finished: tuple[Finished, ...] = ()
    # Requests complete after this step (every sample finished, or the scores computed).
    done: tuple[int, ...] = ()


@dataclass
class _Sample:
    slot: int
    # Next position to write: where `token` goes.
    position: int
    # Last sampled token, fed to the next decode; None until the prefill's update.
    token: int | None = None
    generated: int = 0
    live: bool = True


@dataclass
class _Running:
    request: Request
    samples: list[_Sample]
    abort: SaxError | None = None
    # Prompt positions already in the KV cache (GENERATE); the prompt is prefilled when it is
    # len(request.prompt).
    prefilled: int = 0


def _next_chunk(request_id: int, run: _Running, granted: int) -> PrefillWork:
    """The prefill of the next `granted` prompt tokens of a running GENERATE request."""
    prompt, start = run.request.prompt, run.prefilled
    stop = None if start + granted == len(prompt) else start + granted
    slots = tuple(s.slot for s in run.samples)
    return PrefillWork(request_id, prompt, slots, run.request.samples, start, stop)


class Scheduler:
    """Admission (bounded FIFO queue) and continuous batching over `num_slots` KV cache slots
    of `max_seq_len` positions each."""

    def __init__(
        self,
        num_slots: int,
        max_seq_len: int,
        *,
        max_queue: int,
        max_batch_size: int,
        token_budget: int | None = None,
        chunked_prefill: bool = False,
    ) -> None:
        """token_budget: tokens one step runs at most (decode rows and prompt tokens); None: no
        limit. chunked_prefill: whether the runner can prefill a prompt in chunks."""
        if max_queue < 0 or max_batch_size <= 0 or (token_budget is not None and token_budget < 1):
            raise ValueError(
                f"bad limits: max_queue {max_queue}, max_batch_size {max_batch_size}, "
                f"token_budget {token_budget}"
            )
        self._slots = SlotAllocator(num_slots)
        self._max_seq_len = max_seq_len
        self._max_queue = max_queue
        self._max_batch_size = max_batch_size
        self._token_budget = token_budget
        self._chunked = chunked_prefill
        self._waiting: collections.OrderedDict[int, Request] = collections.OrderedDict()
        self._running: dict[int, _Running] = {}
        self._dropped: list[Aborted] = []  # aborted while waiting, reported by the next step
        self._in_flight: SchedulerOutput | None = None
        self._released: list[SampleKey] = []
        self._step = 0

    @property
    def step(self) -> int:
        """Steps scheduled so far."""
        return self._step

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests holding slots."""
        return len(self._running)

    @property
    def num_free_slots(self) -> int:
        return self._slots.num_free

    def has_work(self) -> bool:
        """Whether `schedule` has anything to do."""
        return bool(self._waiting or self._running or self._dropped)

    def add(self, request: Request) -> None:
        """Queues a request. INVALID_ARGUMENT if it can never fit, RESOURCE_EXHAUSTED if the
        queue is full."""
        if request.slots_needed > self._slots.num_slots:
            raise InvalidArgumentError(
                f"the request needs {request.slots_needed} KV cache slots (one per sample); the "
                f"model has {self._slots.num_slots}; ask for fewer samples"
            )
        longest = len(request.prompt) + max((len(s) for s in request.suffixes), default=0)
        if request.kind is RequestKind.GENERATE:
            longest += 1  # room for at least one generated token
        if not request.prompt or longest > self._max_seq_len:
            raise InvalidArgumentError(
                f"the request needs {longest} positions; a KV cache slot holds 1 to "
                f"{self._max_seq_len}; shorten the prompt"
            )
        if request.request_id in self._waiting or request.request_id in self._running:
            raise InternalError(f"request id {request.request_id} is already queued")
        if len(self._waiting) >= self._max_queue:
            raise ResourceExhaustedError(
                f"queue full ({len(self._waiting)} waiting); retry later or on another replica"
            )
        self._waiting[request.request_id] = request

    def abort(self, request_id: int, error: SaxError) -> bool:
        """Drops a request: at once if it waits, at the start of the next step if it runs.
        False if the request is unknown (already done)."""
        if self._waiting.pop(request_id, None) is not None:
            self._dropped.append(Aborted(request_id, error))
            return True
        run = self._running.get(request_id)
        if run is None:
            return False
        if run.abort is None:
            run.abort = error
        return True

    def drain(self) -> list[int]:
        """Forgets every request (shutdown) and returns their ids; all slots are free after."""
        ids = [a.request_id for a in self._dropped] + list(self._waiting) + list(self._running)
        for run in self._running.values():
            self._free_samples(run)
        self._waiting.clear()
        self._running.clear()
        self._dropped.clear()
        self._released.clear()
        self._in_flight = None
        return ids

    def schedule(self, now: float) -> SchedulerOutput:
        """The next step's work; `now` is `time.monotonic()` (for deadlines)."""
        if self._in_flight is not None:
            raise InternalError("schedule() called before update() of the previous step")
        self._step += 1
        aborted = self._drop_stopped(now)
        decodes = self._decode_batches()
        scores, prefills = self._admit(sum(len(b.keys) for b in decodes))
        output = SchedulerOutput(
            step=self._step,
            aborted=tuple(aborted),
            scores=tuple(scores),
            prefills=tuple(prefills),
            decodes=decodes,
            released=tuple(self._released),
        )
        self._released.clear()
        self._in_flight = output
        return output

    def update(
        self,
        output: SchedulerOutput,
        tokens: Mapping[SampleKey, int],
        finished: Mapping[SampleKey, FinishReason],
    ) -> UpdateResult:
        """Records the step's sampled tokens (one per prefilled or decoded sample) and the
        samples the engine finished (EOS, stop string); frees the slots of finished samples.

        Requests aborted while the step ran are skipped (the next `schedule` drops them), so a
        failed step is closed by aborting its requests and updating with no tokens."""
        if output is not self._in_flight:
            raise InternalError("update() of a step that is not the one in flight")
        self._in_flight = None
        done: list[int] = []
        ended: list[Finished] = []
        for work in output.scores:
            run = self._running.get(work.request_id)
            if run is not None and run.abort is None:
                del self._running[work.request_id]
                self._free_samples(run)
                done.append(work.request_id)
        steps: list[tuple[SampleKey, bool]] = []
        for w in output.prefills:
            run = self._running.get(w.request_id)
            if run is not None and run.abort is None:
                run.prefilled = w.end
            if w.final:
                steps += [((w.request_id, i), False) for i in range(len(w.slots))]
        steps += [(key, True) for batch in output.decodes for key in batch.keys]
        for key, decoded in steps:
            run = self._running.get(key[0])
            if run is None or run.abort is not None:
                continue  # aborted during the step: dropped by the next schedule()
            sample = run.samples[key[1]]
            if not sample.live:
                continue
            if key not in tokens:
                raise InternalError(f"no token was sampled for sample {key}")
            sample.token = tokens[key]
            sample.generated += 1
            if decoded:
                sample.position += 1
            reason = finished.get(key)
            if reason is None and (
                sample.generated >= run.request.max_decode_steps
                or sample.position >= self._max_seq_len
            ):
                reason = FinishReason.LENGTH
            if reason is not None:
                sample.live = False
                self._slots.free(sample.slot)
                self._released.append(key)
                ended.append(Finished(key, reason))
                if not any(s.live for s in run.samples):
                    del self._running[key[0]]
                    done.append(key[0])
        return UpdateResult(finished=tuple(ended), done=tuple(done))

    def _stopped(self, request: Request, now: float, generated: int | None) -> SaxError | None:
        if request.cancelled():
            return CancelledError("the caller cancelled the request")
        if request.deadline is not None and now >= request.deadline:
            where = "in the queue" if generated is None else f"after {generated} decode steps"
            return DeadlineExceededError(
                f"the request's deadline passed {where}; retry with a longer deadline, fewer "
                "decode steps, or when the server is less busy"
            )
        return None

    def _drop_stopped(self, now: float) -> list[Aborted]:
        aborted, self._dropped = self._dropped, []
        for request_id, request in list(self._waiting.items()):
            error = self._stopped(request, now, None)
            if error is not None:
                del self._waiting[request_id]
                aborted.append(Aborted(request_id, error))
        for request_id, run in list(self._running.items()):
            generated = max((s.generated for s in run.samples), default=0)
            error = run.abort or self._stopped(run.request, now, generated)
            if error is not None:
                self._free_samples(run)
                del self._running[request_id]
                aborted.append(Aborted(request_id, error))
        return aborted

    def _admit(self, decode_rows: int) -> tuple[list[ScoreWork], list[PrefillWork]]:
        """The step's prompt work within what the decode rows leave of the token budget: the
        rest of prompts being prefilled first, then waiting requests in arrival order."""
        scores: list[ScoreWork] = []
        prefills: list[PrefillWork] = []
        budget = self._token_budget
        left = (
            None if budget is None else max(budget - decode_rows, budget // 4, 1)
        )  # prompt tokens this step may still take; None: any

        def take(wanted: int, chunkable: bool = self._chunked) -> int:
            """Tokens granted to a prompt of `wanted` tokens (0: it waits for a later step)."""
            nonlocal left
            if left is None:
                return wanted
            if wanted <= left or (not chunkable and not scores and not prefills):
                granted = wanted  # whole; alone when it exceeds the budget
            elif chunkable:
                granted = left
            else:
                return 0
            left = max(left - granted, 0)
            return granted

        for rid, run in self._running.items():
            todo = len(run.request.prompt) - run.prefilled
            if run.request.kind is not RequestKind.GENERATE or todo <= 0 or run.abort is not None:
                continue
            granted = take(todo)
            if not granted:
                break
            prefills.append(_next_chunk(rid, run, granted))
        while self._waiting and (left is None or left > 0):
            request = next(iter(self._waiting.values()))
            if request.slots_needed > self._slots.num_free:
                break  # first come, first served: nobody overtakes the head of the queue
            if request.kind is RequestKind.SCORE:
                granted = take(request.prefill_tokens, chunkable=False)  # scored whole
            else:
                granted = take(len(request.prompt))
            if not granted:
                break
            del self._waiting[request.request_id]
            slots = self._slots.allocate(request.slots_needed)
            rid = request.request_id
            run = _Running(request, [_Sample(slot=s, position=len(request.prompt)) for s in slots])
            self._running[rid] = run
            if request.kind is RequestKind.SCORE:
                scores.append(ScoreWork(rid, slots[0], request.prompt, request.suffixes))
            else:
                prefills.append(_next_chunk(rid, run, granted))
        return scores, prefills

    def _decode_batches(self) -> tuple[DecodeBatch, ...]:
        rows: list[tuple[int, SampleKey, int, int]] = []
        for request_id, run in self._running.items():
            if run.request.kind is not RequestKind.GENERATE:
                continue
            for i, s in enumerate(run.samples):
                if s.live and s.token is not None:
                    rows.append((s.slot, (request_id, i), s.token, s.position))
        rows.sort()
        batches = []
        for start in range(0, len(rows), self._max_batch_size):
            chunk = rows[start : start + self._max_batch_size]
            batches.append(
                DecodeBatch(
                    keys=tuple(r[1] for r in chunk),
                    slots=tuple(r[0] for r in chunk),
                    tokens=tuple(r[2] for r in chunk),
                    positions=tuple(r[3] for r in chunk),
                )
            )
        return tuple(batches)

    def _free_samples(self, run: _Running) -> None:
        generate = run.request.kind is RequestKind.GENERATE
        for i, s in enumerate(run.samples):
            if s.live:
                s.live = False
                self._slots.free(s.slot)
                if generate:
                    self._released.append((run.request.request_id, i))
