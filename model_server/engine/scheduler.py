"""Continuous batching over a paged KV cache, in pure Python (no torch, no device).

Each engine step asks the scheduler what to run (`schedule`), runs it, and reports the sampled
tokens back (`update`). A step first drops the requests that were aborted, cancelled or have
passed their deadline (freeing their blocks). It then schedules one decode row for every running
sample (in batches of at most `max_batch_size`): decodes are never held back by prompts. The
rest of the step's token budget (`token_budget`, vLLM's `max_num_batched_tokens`) goes to
prompts: first the rest of the prompts already being prefilled, then waiting requests in
arrival order while enough sequences (`max_seqs`, one per sample) and KV cache blocks are free.
With `chunked_prefill` a prompt longer than what is left of the budget is split over several
steps (its first token is sampled at the end of its last chunk); without it a prompt runs whole,
alone when it exceeds the budget. Several prompts share a step when they fit. Prompts get at
least a quarter of the budget per step, so they progress while many samples decode.

The KV cache is a `BlockPool` (`kv_cache`): each sample holds a block table. The samples of a
request share the full blocks of its prompt; each gets its own copy of the prompt's last,
partial block when the prompt is done (`PrefillWork.copies`). With chunked prefill a new
prompt first looks for its leading full blocks in the prefix cache and prefills only the rest.
A sample that crosses into a new block gets one before its decode row; when none is free the
most recently admitted request is preempted: its blocks are given back and it waits at the head
of the queue. When it runs again each of its samples refills its prompt and the tokens it had
generated (a prefill that samples nothing, mostly from the prefix cache), then decodes on:
nothing is lost and no request fails for want of blocks.

A request with `speculative_tokens` (and a runner that can verify: `speculation`) has its
samples guess their next tokens by prompt lookup (`prompt_lookup`). A sample with a guess runs a
`VerifyWork` instead of a decode row: its last token and the draft, in one chunk at its position,
in the same pass as the decodes; the runner keeps the draft tokens the model agrees with and one
of its own. Drafts never need more decode steps or positions than the sample has left, take
blocks only while others stay free for the growing samples, and count against the token budget.

Samples that finish (EOS or stop string, decided by the engine; decode steps or slot length,
decided here) free their blocks at once, so a new request can take them on the next step.

The scheduler is not thread-safe; the engine calls it under its lock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from model_server.engine.kv_cache import BlockHash, BlockPool, block_hashes, blocks_for
from model_server.engine.prompt_lookup import PromptLookup
from model_server.engine.request import FinishReason, Request, RequestKind, SampleOptions
from sax.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    SaxError,
)

logger = logging.getLogger(__name__)

# (request_id, sample index)
SampleKey = tuple[int, int]


@dataclass(frozen=True)
class BlockCopy:
    """Copy positions [0, length) of KV cache block src into block dst."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class PrefillWork:
    """Run positions [start, end) of a sequence into its block table `blocks` (positions before
    `start` are in its KV cache already).

    A new prompt: the sequence is the prompt, run for sample 0; `samples` holds every sample's
    options and `forks` the block tables of samples 1.., which share the prompt's full blocks.
    On the last chunk (`final`) the runner makes `copies` (each fork's own copy of the partial
    last block) and samples every sample's first token from the last position.

    A resume after preemption (`samples` empty): the sequence is the prompt and the tokens
    sample `sample` had generated but the last (which its next decode row feeds); nothing is
    sampled."""

    request_id: int
    # The whole sequence.
    tokens: tuple[int, ...]
    # Its block table (enough blocks for the whole sequence).
    blocks: tuple[int, ...]
    # How each sample picks its tokens, in sample order; empty on a resume.
    samples: tuple[SampleOptions, ...] = ()
    # The chunk: positions [start, stop); stop None: to the end of the sequence.
    start: int = 0
    stop: int | None = None
    # Block tables of samples 1.. of a new prompt.
    forks: tuple[tuple[int, ...], ...] = ()
    # The sample whose sequence this is (a resume); 0 for a new prompt.
    sample: int = 0
    # Positions per block (to place the copies); by default one block holds the sequence (a
    # backend with one slot per sequence).
    block_size: int = 1 << 30

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
        """Whether the chunk ends the sequence."""
        return self.end == len(self.tokens)

    @property
    def resume(self) -> bool:
        """Whether this refills a preempted sample (nothing sampled)."""
        return not self.samples

    @property
    def sampled_keys(self) -> tuple[SampleKey, ...]:
        """The samples whose first token this chunk samples (a new prompt's final chunk)."""
        if not self.final or self.resume:
            return ()
        return tuple((self.request_id, i) for i in range(len(self.samples)))

    @property
    def slots(self) -> tuple[int, ...]:
        """The first block of every sample's table: its slot, for a runner with one block per
        sequence."""
        return (self.blocks[0], *(f[0] for f in self.forks))

    @property
    def copies(self) -> tuple[BlockCopy, ...]:
        """What the final chunk copies for the forks: the partial last block of the prompt."""
        if not self.final:
            return ()
        n = len(self.tokens)
        last = (n - 1) // self.block_size
        length = n - last * self.block_size
        src = self.blocks[last]
        return tuple(BlockCopy(src, f[last], length) for f in self.forks if f[last] != src)


@dataclass(frozen=True)
class ScoreWork:
    """Run prefix + each suffix in the block table `blocks` and sum the suffix tokens'
    log-probabilities."""

    request_id: int
    blocks: tuple[int, ...]
    prefix: tuple[int, ...]
    suffixes: tuple[tuple[int, ...], ...]

    @property
    def slot(self) -> int:
        """The first block: the slot of a runner with one block per sequence."""
        return self.blocks[0]


@dataclass(frozen=True)
class DecodeBatch:
    """One runner decode call: token i goes to position positions[i] of the sequence with
    block table blocks[i]."""

    keys: tuple[SampleKey, ...]
    blocks: tuple[tuple[int, ...], ...]
    tokens: tuple[int, ...]
    positions: tuple[int, ...]

    @property
    def slots(self) -> tuple[int, ...]:
        """Each row's first block: its slot, for a runner with one block per sequence."""
        return tuple(b[0] for b in self.blocks)


@dataclass(frozen=True)
class VerifyWork:
    """A speculating sample's decode: `tokens` (its last sampled token, then the draft) go to
    positions [position, position + len(tokens)) of the sequence with block table `blocks`; the
    runner samples a token after each and keeps them while they agree with the draft (1 to
    len(tokens) tokens)."""

    key: SampleKey
    blocks: tuple[int, ...]
    tokens: tuple[int, ...]
    position: int

    @property
    def draft(self) -> tuple[int, ...]:
        """The guessed tokens."""
        return self.tokens[1:]

    @property
    def end(self) -> int:
        """The position after the chunk."""
        return self.position + len(self.tokens)


@dataclass(frozen=True)
class Aborted:
    """A request dropped this step (its blocks are free again); tell its caller `error`."""

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
    # Decodes of samples with a draft, after the decode batches.
    verifies: tuple[VerifyWork, ...] = ()
    # Samples that ended (finished, aborted) since the previous step: the runner drops their
    # sampler state.
    released: tuple[SampleKey, ...] = ()

    def request_ids(self) -> set[int]:
        """Requests that run in this step."""
        ids = {w.request_id for w in self.scores} | {w.request_id for w in self.prefills}
        ids |= {v.key[0] for v in self.verifies}
        return ids | {key[0] for batch in self.decodes for key in batch.keys}


@dataclass(frozen=True)
class Finished:
    """A sample that finished in the step; its blocks are free again."""

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
    # Block table; empty while the request is preempted.
    blocks: list[int]
    # Next position to write: where `token` goes.
    position: int
    # Positions whose K/V are in the blocks.
    filled: int = 0
    # Last sampled token, fed to the next decode; None until the prefill's update.
    token: int | None = None
    generated: int = 0
    live: bool = True
    # Every generated token (a resume refills all but the last).
    history: list[int] = field(default_factory=list)
    # Block hashes of the sequence's leading full blocks, as far as computed (prefix cache).
    hashes: list[BlockHash] = field(default_factory=list)
    # The n-gram index of prompt + history (speculating samples, from their first decode).
    lookup: PromptLookup | None = None

    def ready(self) -> bool:
        """Whether the sample decodes this step."""
        return self.live and self.token is not None and self.filled == self.position


@dataclass
class _Running:
    request: Request
    samples: list[_Sample]
    abort: SaxError | None = None
    # Prompt positions already in sample 0's KV cache (GENERATE); the prompt is prefilled when
    # it is len(request.prompt).
    prefilled: int = 0

    @property
    def prompt_done(self) -> bool:
        return self.samples[0].token is not None

    def sequence(self, sample: _Sample) -> tuple[int, ...]:
        """What a resumed sample refills: the prompt and its tokens but the last."""
        return self.request.prompt + tuple(sample.history[:-1])


class Scheduler:
    """Admission (bounded FIFO queue) and continuous batching of at most `max_seqs` sequences
    over `num_blocks` KV cache blocks of `block_size` positions (one slot of `max_seq_len`
    positions per sequence by default)."""

    def __init__(
        self,
        max_seqs: int,
        max_seq_len: int,
        *,
        max_queue: int,
        max_batch_size: int,
        token_budget: int | None = None,
        chunked_prefill: bool = False,
        block_size: int | None = None,
        num_blocks: int | None = None,
        prefix_caching: bool = True,
        speculation: bool = False,
    ) -> None:
        """token_budget: tokens one step runs at most (decode rows and prompt tokens); None: no
        limit. chunked_prefill: whether the runner can prefill a sequence in chunks (and so
        start past a cached prefix). block_size / num_blocks: the KV cache's blocks (default:
        one block of max_seq_len positions per sequence). speculation: whether the runner runs
        `VerifyWork` (requests' speculative_tokens are ignored otherwise)."""
        if max_queue < 0 or max_batch_size <= 0 or (token_budget is not None and token_budget < 1):
            raise ValueError(
                f"bad limits: max_queue {max_queue}, max_batch_size {max_batch_size}, "
                f"token_budget {token_budget}"
            )
        if max_seqs <= 0:
            raise ValueError(f"max_seqs must be positive, got {max_seqs}")
        size = block_size or max_seq_len
        self._pool = BlockPool(
            num_blocks or max_seqs * blocks_for(max_seq_len, size),
            size,
            prefix_caching=prefix_caching and chunked_prefill,
        )
        self._max_seqs = max_seqs
        self._max_seq_len = max_seq_len
        self._max_queue = max_queue
        self._max_batch_size = max_batch_size
        self._token_budget = token_budget
        self._chunked = chunked_prefill
        self._speculation = speculation
        self._waiting: collections.OrderedDict[int, Request] = collections.OrderedDict()
        self._preempted: dict[int, _Running] = {}  # waiting again, with what they had made
        self._running: dict[int, _Running] = {}
        self._dropped: list[Aborted] = []  # aborted while waiting, reported by the next step
        self._in_flight: SchedulerOutput | None = None
        self._released: list[SampleKey] = []
        self._step = 0
        self._preemptions = 0

    @property
    def step(self) -> int:
        """Steps scheduled so far."""
        return self._step

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests holding KV cache blocks."""
        return len(self._running)

    @property
    def max_seqs(self) -> int:
        """Sequences (samples) that may run at once."""
        return self._max_seqs

    @property
    def num_free_slots(self) -> int:
        """Sequences that may still start."""
        return self._max_seqs - self._seqs_running()

    @property
    def pool(self) -> BlockPool:
        """The KV cache blocks (read their counters, do not change them)."""
        return self._pool

    @property
    def preemptions(self) -> int:
        """Requests preempted so far."""
        return self._preemptions

    def has_work(self) -> bool:
        """Whether `schedule` has anything to do."""
        return bool(self._waiting or self._running or self._dropped)

    def add(self, request: Request) -> None:
        """Queues a request. INVALID_ARGUMENT if it can never fit, RESOURCE_EXHAUSTED if the
        queue is full."""
        if request.slots_needed > self._max_seqs:
            raise InvalidArgumentError(
                f"the request needs {request.slots_needed} sequences (one per sample); the "
                f"model runs {self._max_seqs} at once; ask for fewer samples"
            )
        longest = len(request.prompt) + max((len(s) for s in request.suffixes), default=0)
        if request.kind is RequestKind.GENERATE:
            longest += 1  # room for at least one generated token
        if not request.prompt or longest > self._max_seq_len:
            raise InvalidArgumentError(
                f"the request needs {longest} positions; a sequence holds 1 to "
                f"{self._max_seq_len}; shorten the prompt"
            )
        most = longest
        if request.kind is RequestKind.GENERATE:
            most = min(len(request.prompt) + request.max_decode_steps, self._max_seq_len)
        blocks = request.slots_needed * blocks_for(most, self._pool.block_size)
        if blocks > self._pool.num_blocks:
            raise InvalidArgumentError(
                f"the request may need {blocks} KV cache blocks, the model has "
                f"{self._pool.num_blocks}; ask for fewer samples or decode steps"
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
            self._forget_preempted(request_id)
            self._dropped.append(Aborted(request_id, error))
            return True
        run = self._running.get(request_id)
        if run is None:
            return False
        if run.abort is None:
            run.abort = error
        return True

    def drain(self) -> list[int]:
        """Forgets every request (shutdown) and returns their ids; all blocks are free after."""
        ids = [a.request_id for a in self._dropped] + list(self._waiting) + list(self._running)
        for run in self._running.values():
            self._free_samples(run)
        self._waiting.clear()
        self._preempted.clear()
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
        preempted = self._grow()
        decodes, verifies = self._decode_batches()
        decode_tokens = sum(len(b.keys) for b in decodes) + sum(len(v.tokens) for v in verifies)
        # After a preemption nothing new starts this step (it would take the blocks back).
        scores, prefills = self._admit(decode_tokens, not preempted)
        output = SchedulerOutput(
            step=self._step,
            aborted=tuple(aborted),
            scores=tuple(scores),
            prefills=tuple(prefills),
            decodes=decodes,
            verifies=verifies,
            released=tuple(self._released),
        )
        self._released.clear()
        self._in_flight = output
        return output

    def update(
        self,
        output: SchedulerOutput,
        tokens: Mapping[SampleKey, int | Sequence[int]],
        finished: Mapping[SampleKey, FinishReason],
    ) -> UpdateResult:
        """Records the step's sampled tokens (one per sample of a final prompt chunk and per
        decode row; the kept ones, in order, per verify) and the samples the engine finished
        (EOS, stop string: at their last token given); frees the blocks of finished samples.

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
            if run is None or run.abort is not None:
                continue
            sample = run.samples[w.sample]
            sample.filled = w.end
            self._pool.register(w.blocks, sample.hashes[: w.end // self._pool.block_size])
            if not w.resume:
                run.prefilled = w.end
                if w.final:
                    for other in run.samples[1:]:
                        other.filled = w.end
            steps += [(key, False) for key in w.sampled_keys]
        steps += [(key, True) for batch in output.decodes for key in batch.keys]
        steps += [(v.key, True) for v in output.verifies]
        for key, decoded in steps:
            run = self._running.get(key[0])
            if run is None or run.abort is not None:
                continue  # aborted during the step: dropped by the next schedule()
            sample = run.samples[key[1]]
            if not sample.live:
                continue
            if key not in tokens:
                raise InternalError(f"no token was sampled for sample {key}")
            given = tokens[key]
            kept = (given,) if isinstance(given, int) else tuple(given)
            if not kept:
                raise InternalError(f"no token was sampled for sample {key}")
            reason = None
            for i, token in enumerate(kept):
                sample.token = token
                sample.history.append(token)
                if sample.lookup is not None:
                    sample.lookup.extend((token,))
                sample.generated += 1
                if decoded:
                    sample.position += 1
                    sample.filled += 1
                if i == len(kept) - 1:
                    reason = finished.get(key)
                if reason is None and (
                    sample.generated >= run.request.max_decode_steps
                    or sample.position >= self._max_seq_len
                ):
                    reason = FinishReason.LENGTH
                if reason is not None:
                    break
            if reason is not None:
                sample.live = False
                self._pool.release(sample.blocks)
                sample.blocks = []
                self._released.append(key)
                ended.append(Finished(key, reason))
                if not any(s.live for s in run.samples):
                    del self._running[key[0]]
                    done.append(key[0])
        return UpdateResult(finished=tuple(ended), done=tuple(done))

    def _seqs_running(self) -> int:
        return sum(sum(1 for s in run.samples if s.live) for run in self._running.values())

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
                self._forget_preempted(request_id)
                aborted.append(Aborted(request_id, error))
        for request_id, run in list(self._running.items()):
            generated = max((s.generated for s in run.samples), default=0)
            error = run.abort or self._stopped(run.request, now, generated)
            if error is not None:
                self._free_samples(run)
                del self._running[request_id]
                aborted.append(Aborted(request_id, error))
        return aborted

    def _forget_preempted(self, request_id: int) -> None:
        """A preempted request left the queue: the runner may drop its samples' state."""
        run = self._preempted.pop(request_id, None)
        if run is not None:
            self._released += [(request_id, i) for i, s in enumerate(run.samples) if s.live]

    # KV cache blocks.

    def _grow(self) -> bool:
        """Gives every sample about to decode into a new block that block, oldest requests
        first, preempting the newest when none is free; returns whether it preempted."""
        bs = self._pool.block_size
        before = self._preemptions
        for rid in list(self._running):
            run = self._running.get(rid)
            if run is None:
                continue  # preempted for an older request
            for sample in run.samples:
                if not sample.ready() or sample.position < len(sample.blocks) * bs:
                    continue
                while self._pool.num_free == 0 and rid in self._running:
                    self._preempt(next(reversed(self._running)))
                if rid not in self._running:
                    break  # it was the newest: it waits now
                sample.blocks += self._pool.allocate(1)
        return self._preemptions != before

    def _preempt(self, request_id: int) -> None:
        """Gives back every block of a running request and queues it first again."""
        run = self._running.pop(request_id)
        self._preemptions += 1
        logger.info(
            "KV cache full: request %d preempted after %d tokens; it resumes when blocks free up",
            request_id,
            max(s.generated for s in run.samples),
        )
        for sample in run.samples:
            if sample.blocks:
                self._pool.release(sample.blocks)
            sample.blocks, sample.filled = [], 0
        if run.prompt_done:
            self._preempted[request_id] = run
        self._waiting[request_id] = run.request
        self._waiting.move_to_end(request_id, last=False)

    def _hashes(self, tokens: tuple[int, ...], known: list[BlockHash]) -> list[BlockHash]:
        """A sequence's block hashes, extending those computed before (none without prefix
        caching)."""
        if not self._pool.prefix_caching:
            return []
        return block_hashes(tokens, self._pool.block_size, known)

    def _hits(self, hashes: list[BlockHash], length: int) -> list[int]:
        """Cached blocks a sequence of `length` tokens can start from (leaving at least its
        last token to run)."""
        return self._pool.lookup(hashes, (length - 1) // self._pool.block_size)

    def _start(self, request: Request) -> _Running | None:
        """Blocks for a new GENERATE request: sample 0's prompt (after its cached prefix), and
        for each other sample the shared full blocks plus its own partial last block. None when
        too few blocks are free."""
        pool, prompt = self._pool, request.prompt
        hashes = self._hashes(prompt, [])
        hits = self._hits(hashes, len(prompt))
        total = blocks_for(len(prompt), pool.block_size)
        partial = len(prompt) % pool.block_size != 0
        needed = total - len(hits) + (len(request.samples) - 1) * partial
        if needed > pool.free_after_hold(hits):
            return None
        pool.record_query(len(prompt), len(hits))
        pool.hold(hits)
        table = hits + pool.allocate(total - len(hits))
        shared = table[:-1] if partial else table
        filled = len(hits) * pool.block_size
        samples = [_Sample(table, len(prompt), filled=filled, hashes=hashes)]
        for _ in request.samples[1:]:
            pool.hold(shared)
            own = shared + (pool.allocate(1) if partial else [])
            samples.append(_Sample(own, len(prompt), hashes=list(hashes)))
        return _Running(request, samples, prefilled=samples[0].filled)

    def _resume(self, run: _Running) -> bool:
        """Blocks for a preempted request's live samples (after their cached prefixes); False
        when too few blocks are free."""
        pool = self._pool
        live = [s for s in run.samples if s.live]
        for s in live:
            s.hashes = self._hashes(run.sequence(s), s.hashes)
        hits = [self._hits(s.hashes, s.position) for s in live]
        needed = sum(blocks_for(s.position, pool.block_size) for s in live)
        needed -= sum(len(h) for h in hits)
        if needed > pool.free_after_hold(b for h in hits for b in h):
            return False
        for sample, found in zip(live, hits, strict=True):
            pool.record_query(sample.position, len(found))
            pool.hold(found)
            sample.blocks = found + pool.allocate(
                blocks_for(sample.position, pool.block_size) - len(found)
            )
            sample.filled = len(found) * pool.block_size
        return True

    # Admission.

    def _admit(
        self, decode_rows: int, admit_waiting: bool = True
    ) -> tuple[list[ScoreWork], list[PrefillWork]]:
        """The step's prompt work within what the decode rows leave of the token budget: the
        rest of sequences being prefilled first, then (admit_waiting) waiting requests in
        arrival order."""
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

        def grants(wanted: int) -> bool:
            """Whether `take` would grant a whole (unchunkable) prompt anything."""
            return left is None or self._chunked or wanted <= left or not (scores or prefills)

        def fill(rid: int, run: _Running) -> bool:
            """Chunks for the sequences of a running request still to prefill; False when the
            budget ran out."""
            for work in self._to_fill(rid, run):
                granted = take(work.end - work.start)
                if not granted:
                    return False
                stop = None if work.start + granted == len(work.tokens) else work.start + granted
                prefills.append(dataclasses.replace(work, stop=stop))
            return True

        for rid, run in self._running.items():
            generate = run.request.kind is RequestKind.GENERATE
            if generate and run.abort is None and not fill(rid, run):
                break
        while admit_waiting and self._waiting and (left is None or left > 0):
            request = next(iter(self._waiting.values()))
            rid = request.request_id
            if request.slots_needed > self.num_free_slots:
                break  # first come, first served: nobody overtakes the head of the queue
            if request.kind is RequestKind.SCORE:
                blocks = blocks_for(
                    len(request.prompt) + max(len(x) for x in request.suffixes),
                    self._pool.block_size,
                )
                if blocks > self._pool.num_free or not take(request.prefill_tokens, False):
                    break
                del self._waiting[rid]
                table = self._pool.allocate(blocks)
                self._running[rid] = _Running(request, [_Sample(table, len(request.prompt))])
                scores.append(ScoreWork(rid, tuple(table), request.prompt, request.suffixes))
                continue
            resumed = self._preempted.get(rid)
            if not grants(len(request.prompt)):
                break
            if resumed is not None:
                if not self._resume(resumed):
                    break
                run = resumed
                del self._preempted[rid]
            else:
                started = self._start(request)
                if started is None:
                    break
                run = started
            del self._waiting[rid]
            self._running[rid] = run
            if not fill(rid, run):
                break
        return scores, prefills

    def _to_fill(self, rid: int, run: _Running) -> list[PrefillWork]:
        """The unfilled rest of a running request's sequences, as whole chunks."""
        bs = self._pool.block_size
        if not run.prompt_done:
            if run.prefilled >= len(run.request.prompt):
                return []
            forks = tuple(tuple(s.blocks) for s in run.samples[1:])
            head = run.samples[0]
            return [
                PrefillWork(
                    rid,
                    run.request.prompt,
                    tuple(head.blocks),
                    run.request.samples,
                    run.prefilled,
                    forks=forks,
                    block_size=bs,
                )
            ]
        return [
            PrefillWork(
                rid, run.sequence(s), tuple(s.blocks), (), s.filled, sample=i, block_size=bs
            )
            for i, s in enumerate(run.samples)
            if s.live and s.filled < s.position
        ]

    def _decode_batches(self) -> tuple[tuple[DecodeBatch, ...], tuple[VerifyWork, ...]]:
        rows: list[tuple[tuple[int, ...], SampleKey, int, int]] = []
        verifies: list[VerifyWork] = []
        growing = self._seqs_running()  # blocks a draft leaves free: one per running sample
        for request_id, run in self._running.items():
            if run.request.kind is not RequestKind.GENERATE:
                continue
            for i, s in enumerate(run.samples):
                if not s.ready():
                    continue
                assert s.token is not None
                draft = self._draft(run, s, growing)
                if draft:
                    verifies.append(
                        VerifyWork((request_id, i), tuple(s.blocks), (s.token, *draft), s.position)
                    )
                else:
                    rows.append((tuple(s.blocks), (request_id, i), s.token, s.position))
        rows.sort()
        batches = []
        for start in range(0, len(rows), self._max_batch_size):
            chunk = rows[start : start + self._max_batch_size]
            batches.append(
                DecodeBatch(
                    keys=tuple(r[1] for r in chunk),
                    blocks=tuple(r[0] for r in chunk),
                    tokens=tuple(r[2] for r in chunk),
                    positions=tuple(r[3] for r in chunk),
                )
            )
        return tuple(batches), tuple(verifies)

    def _draft(self, run: _Running, sample: _Sample, reserve: int) -> tuple[int, ...]:
        """A speculating sample's guess at its next tokens (after `sample.token`), as long as
        its decode steps, its sequence and the free blocks beyond `reserve` allow; () for the
        others."""
        k = run.request.speculative_tokens
        if not self._speculation or k <= 0:
            return ()
        if sample.lookup is None:
            sample.lookup = PromptLookup(run.request.prompt + tuple(sample.history))
        # The last draft token's successor is the model's own: a step makes up to k + 1 tokens.
        k = min(
            k,
            run.request.max_decode_steps - sample.generated - 1,
            self._max_seq_len - sample.position - 1,
        )
        draft = sample.lookup.propose(k)
        if not draft:
            return ()
        bs = self._pool.block_size
        needed = blocks_for(sample.position + 1 + len(draft), bs) - len(sample.blocks)
        # Blocks for a draft come only from what the growing samples cannot need next step.
        spare = self._pool.num_free - reserve
        if needed > max(spare, 0):
            room = len(sample.blocks) * bs - sample.position - 1
            if room <= 0:
                return ()
            return draft[:room]
        if needed > 0:
            sample.blocks += self._pool.allocate(needed)
        return draft

    def _free_samples(self, run: _Running) -> None:
        generate = run.request.kind is RequestKind.GENERATE
        for i, s in enumerate(run.samples):
            if s.live:
                s.live = False
                if s.blocks:
                    self._pool.release(s.blocks)
                    s.blocks = []
                if generate:
                    self._released.append((run.request.request_id, i))
