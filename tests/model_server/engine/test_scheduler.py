"""Scheduler: bounded queue, continuous batching, slot reuse, aborts and deadlines (no torch)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading

import pytest

from model_server.engine.request import FinishReason, Request, RequestKind, SampleOptions
from model_server.engine.scheduler import PrefillWork, SampleKey, Scheduler, SchedulerOutput
from sax.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
)


def gen(
    rid: int,
    prompt_len: int = 3,
    samples: int = 1,
    steps: int = 4,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
) -> Request:
    return Request(
        request_id=rid,
        kind=RequestKind.GENERATE,
        prompt=tuple(range(1, prompt_len + 1)),
        samples=(SampleOptions(),) * samples,
        max_decode_steps=steps,
        deadline=deadline,
        cancel=cancel,
    )


def score(rid: int) -> Request:
    return Request(rid, RequestKind.SCORE, prompt=(1, 2), suffixes=((3,), (4, 5)))


def make(num_slots: int = 4, **kwargs: int | bool) -> Scheduler:
    kwargs.setdefault("max_queue", 8)
    kwargs.setdefault("max_batch_size", 4)
    return Scheduler(num_slots, 32, **kwargs)  # type: ignore[arg-type]


def keys_of(out: SchedulerOutput) -> list[SampleKey]:
    keys = [key for w in out.prefills for key in w.sampled_keys]
    return keys + [k for b in out.decodes for k in b.keys]


def step_tokens(out: SchedulerOutput) -> int:
    """Tokens the step runs through the model: prompt chunks, scored sequences, decode rows."""
    prompts = sum(w.end - w.start for w in out.prefills)
    scored = sum(len(w.prefix) + len(s) for w in out.scores for s in w.suffixes)
    return prompts + scored + sum(len(b.keys) for b in out.decodes)


def run_step(
    s: Scheduler, now: float = 0.0, finished: dict[SampleKey, FinishReason] | None = None
) -> tuple[SchedulerOutput, list[tuple[SampleKey, FinishReason]], tuple[int, ...]]:
    """One step where every sample samples token 7; returns (output, finished, done)."""
    out = s.schedule(now)
    result = s.update(out, dict.fromkeys(keys_of(out), 7), finished or {})
    return out, [(f.key, f.reason) for f in result.finished], result.done


def test_importing_the_scheduler_does_not_import_torch() -> None:
    code = "import sys, model_server.engine.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_full_queue_is_resource_exhausted() -> None:
    s = make(num_slots=1, max_queue=2)
    s.add(gen(1))
    s.add(gen(2))
    with pytest.raises(ResourceExhaustedError, match=r"queue full \(2 waiting\); retry later"):
        s.add(gen(3))
    run_step(s)  # request 1 takes the slot, a queue place frees up
    s.add(gen(3))
    assert s.num_waiting == 2


def test_requests_that_can_never_fit_are_invalid() -> None:
    s = make(num_slots=2)
    with pytest.raises(InvalidArgumentError, match="3 sequences"):
        s.add(gen(1, samples=3))
    with pytest.raises(InvalidArgumentError, match="positions"):
        s.add(gen(2, prompt_len=32))  # no room left for a generated token
    with pytest.raises(InvalidArgumentError):
        s.add(gen(3, prompt_len=0))


def test_prefill_then_decode_with_positions() -> None:
    s = make()
    s.add(gen(1, prompt_len=3, samples=2))
    out = s.schedule(0.0)
    assert [(w.request_id, w.tokens, w.slots) for w in out.prefills] == [(1, (1, 2, 3), (0, 1))]
    assert out.decodes == ()  # a prefilled request decodes from the next step
    s.update(out, {(1, 0): 10, (1, 1): 11}, {})
    out = s.schedule(0.0)
    assert out.prefills == ()
    (batch,) = out.decodes
    assert (batch.keys, batch.slots, batch.tokens, batch.positions) == (
        ((1, 0), (1, 1)),
        (0, 1),
        (10, 11),
        (3, 3),
    )
    s.update(out, {(1, 0): 12, (1, 1): 13}, {})
    (batch,) = s.schedule(0.0).decodes
    assert (batch.tokens, batch.positions) == ((12, 13), (4, 4))


def test_new_request_joins_between_decode_steps_and_finished_slots_free_at_once() -> None:
    s = make(num_slots=2)
    s.add(gen(1, steps=5))
    run_step(s)  # prefill of 1
    run_step(s)  # decode of 1
    s.add(gen(2, steps=2))
    out, _, _ = run_step(s)  # 2 is prefilled while 1 keeps decoding
    assert [w.request_id for w in out.prefills] == [2]
    assert [b.keys for b in out.decodes] == [((1, 0),)]
    s.add(gen(3, steps=2))
    s.add(gen(4, steps=2))
    out, finished, done = run_step(s)  # 2 generates its 2nd token: done, slot 1 free now
    assert finished == [((2, 0), FinishReason.LENGTH)] and done == (2,)
    assert s.num_free_slots == 1
    out, _, _ = run_step(s)
    assert [(w.request_id, w.slots) for w in out.prefills] == [(3, (1,))]  # 4 waits
    assert s.num_waiting == 1


def test_engine_finishes_free_the_slot_and_the_lowest_slot_is_reused() -> None:
    s = make(num_slots=3)
    for rid in (1, 2, 3):
        s.add(gen(rid, steps=10))
    run_step(s)
    _, finished, done = run_step(s, finished={(2, 0): FinishReason.EOS})
    assert finished == [((2, 0), FinishReason.EOS)] and done == (2,)
    s.add(gen(4))
    out, _, _ = run_step(s)
    assert out.prefills[0].slots == (1,)  # the slot request 2 had
    assert [b.slots for b in out.decodes] == [(0, 2)]


def test_samples_of_one_request_finish_separately() -> None:
    s = make()
    s.add(gen(1, samples=2, steps=5))
    run_step(s)
    _, finished, done = run_step(s, finished={(1, 1): FinishReason.STOP})
    assert finished == [((1, 1), FinishReason.STOP)] and done == ()
    assert s.num_free_slots == 3
    out, _, _ = run_step(s)
    assert [b.keys for b in out.decodes] == [((1, 0),)]


def test_decode_batches_are_sorted_by_slot_and_capped() -> None:
    s = make(num_slots=6, max_batch_size=4)
    for rid in range(1, 7):
        s.add(gen(rid, steps=9))
    run_step(s)
    out = s.schedule(0.0)
    assert [b.slots for b in out.decodes] == [(0, 1, 2, 3), (4, 5)]


def test_length_limit_of_the_slot() -> None:
    s = Scheduler(1, 6, max_queue=1, max_batch_size=1)
    s.add(gen(1, prompt_len=3, steps=100))
    reasons = []
    for _ in range(10):
        _, finished, done = run_step(s)
        reasons += finished
        if done:
            break
    # Tokens go to positions 3, 4, 5: the 4th sampled token has no room left.
    assert reasons == [((1, 0), FinishReason.LENGTH)]
    assert s.step == 4 and s.num_free_slots == 1


def test_abort_of_a_waiting_request_frees_its_queue_place_at_once() -> None:
    s = make(num_slots=1, max_queue=1)
    s.add(gen(1))
    run_step(s)
    s.add(gen(2))
    assert s.abort(2, CancelledError("gone"))
    s.add(gen(3))  # the place is free again
    out = s.schedule(0.0)
    assert [(a.request_id, type(a.error)) for a in out.aborted] == [(2, CancelledError)]
    assert not s.abort(99, CancelledError("unknown"))


def test_abort_of_a_running_request_frees_its_slots_by_the_next_step() -> None:
    s = make(num_slots=2)
    s.add(gen(1, samples=2, steps=10))
    out = s.schedule(0.0)
    s.abort(1, CancelledError("client went away"))  # during the step
    result = s.update(out, {(1, 0): 5, (1, 1): 6}, {})
    assert result.done == ()  # the aborted request is not advanced
    s.add(gen(2))
    out = s.schedule(0.0)
    assert [a.request_id for a in out.aborted] == [1]
    assert [(w.request_id, w.slots) for w in out.prefills] == [(2, (0,))]
    assert out.decodes == ()


def test_cancel_event_and_deadline_are_checked_every_step() -> None:
    cancel = threading.Event()
    s = make(num_slots=1)
    s.add(gen(1, steps=10, cancel=cancel))
    s.add(gen(2, steps=10, deadline=5.0))  # waits for the slot
    run_step(s, now=1.0)
    cancel.set()
    out, _, _ = run_step(s, now=2.0)
    assert [(a.request_id, type(a.error)) for a in out.aborted] == [(1, CancelledError)]
    assert [w.request_id for w in out.prefills] == [2]
    out, _, _ = run_step(s, now=6.0)
    assert [(a.request_id, type(a.error)) for a in out.aborted] == [(2, DeadlineExceededError)]
    assert "after 1 decode steps" in str(out.aborted[0].error)
    assert s.num_free_slots == 1 and not s.has_work()


def test_deadline_while_waiting() -> None:
    s = make(num_slots=1)
    s.add(gen(1, steps=10))
    s.add(gen(2, deadline=1.0))
    run_step(s, now=0.0)
    out, _, _ = run_step(s, now=2.0)
    assert [a.request_id for a in out.aborted] == [2]
    assert "in the queue" in str(out.aborted[0].error)


def test_score_requests_borrow_a_slot_for_one_step() -> None:
    s = make(num_slots=1)
    s.add(score(1))
    s.add(gen(2))
    out = s.schedule(0.0)
    assert [(w.request_id, w.slot, w.suffixes) for w in out.scores] == [(1, 0, ((3,), (4, 5)))]
    assert out.prefills == ()  # FIFO: request 2 waits for the slot
    assert s.update(out, {}, {}).done == (1,)
    out = s.schedule(0.0)
    assert [w.request_id for w in out.prefills] == [2]


def test_prefill_token_budget_spreads_admissions_over_steps() -> None:
    s = make(num_slots=4, token_budget=5)
    for rid in (1, 2, 3):
        s.add(gen(rid, prompt_len=3))
    out, _, _ = run_step(s)
    assert [w.request_id for w in out.prefills] == [1]  # 3 + 3 > 5
    out, _, _ = run_step(s)
    assert [w.request_id for w in out.prefills] == [2]
    big = make(num_slots=2, token_budget=2)
    big.add(gen(1, prompt_len=4))
    assert big.schedule(0.0).prefills  # a request longer than the budget still runs alone


def test_step_protocol_is_enforced() -> None:
    s = make()
    s.add(gen(1))
    out = s.schedule(0.0)
    with pytest.raises(InternalError):
        s.schedule(0.0)
    with pytest.raises(InternalError, match="no token"):
        s.update(out, {}, {})


def test_drain_forgets_everything() -> None:
    s = make(num_slots=1)
    s.add(gen(1))
    run_step(s)
    s.add(gen(2))
    s.add(gen(3))
    s.abort(3, CancelledError("x"))
    assert sorted(s.drain()) == [1, 2, 3]
    assert s.num_free_slots == 1 and not s.has_work()


def prompt_chunks(s: Scheduler, rid: int, steps: int) -> list[tuple[int, int, bool]]:
    """Runs `steps` steps; the (start, end, final) chunks request rid got, in order."""
    chunks = []
    for _ in range(steps):
        out, _, _ = run_step(s)
        chunks += [(w.start, w.end, w.final) for w in out.prefills if w.request_id == rid]
    return chunks


def test_decode_rows_run_every_step_while_a_long_prompt_is_chunked() -> None:
    s = make(num_slots=4, token_budget=8, chunked_prefill=True)
    s.add(gen(1, prompt_len=3, steps=20))
    run_step(s)  # request 1 prefilled; it decodes from now on
    s.add(gen(2, prompt_len=20, steps=4))
    seen = []
    for _ in range(3):
        out, _, _ = run_step(s)
        assert step_tokens(out) <= 8
        assert [k for b in out.decodes for k in b.keys] == [(1, 0)]  # never held back
        seen += [(w.start, w.end, w.final) for w in out.prefills]
    assert seen == [(0, 7, False), (7, 14, False), (14, 20, True)]  # 1 decode + 7 prompt
    out, _, _ = run_step(s)
    assert sorted(k for b in out.decodes for k in b.keys) == [(1, 0), (2, 0)]


def test_a_sample_gets_its_first_token_only_after_the_last_chunk() -> None:
    s = make(num_slots=4, token_budget=4, chunked_prefill=True)
    s.add(gen(1, prompt_len=10, samples=2, steps=2))
    out = s.schedule(0.0)
    (work,) = out.prefills
    assert (work.chunk, work.slots, work.final) == ((1, 2, 3, 4), (0, 1), False)
    assert s.update(out, {}, {}).finished == ()  # no token expected yet
    out, _, _ = run_step(s)
    assert [(w.start, w.end) for w in out.prefills] == [(4, 8)] and not out.decodes
    out = s.schedule(0.0)
    assert [(w.start, w.end, w.final) for w in out.prefills] == [(8, 10, True)]
    with pytest.raises(InternalError, match="no token"):
        s.update(out, {(1, 0): 5}, {})  # the final chunk samples every sample


def test_several_prompts_share_a_step_within_the_budget() -> None:
    s = make(num_slots=4, token_budget=10, chunked_prefill=True)
    for rid, n in ((1, 3), (2, 4), (3, 6)):
        s.add(gen(rid, prompt_len=n))
    out, _, _ = run_step(s)
    assert [(w.request_id, w.start, w.end) for w in out.prefills] == [
        (1, 0, 3),
        (2, 0, 4),
        (3, 0, 3),  # what is left of the budget
    ]
    out, _, _ = run_step(s)
    # Request 3's rest goes before anything new; the two done prompts decode beside it.
    assert [(w.request_id, w.start, w.end) for w in out.prefills] == [(3, 3, 6)]
    assert sorted(k for b in out.decodes for k in b.keys) == [(1, 0), (2, 0)]


def test_a_chunked_prompt_keeps_its_place_before_later_requests() -> None:
    s = make(num_slots=4, token_budget=5, chunked_prefill=True)
    s.add(gen(1, prompt_len=12))
    s.add(gen(2, prompt_len=2))
    chunks = []
    for _ in range(3):
        out, _, _ = run_step(s)
        chunks.append([(w.request_id, w.start, w.end) for w in out.prefills])
    assert chunks[0] == [(1, 0, 5)]
    assert chunks[1] == [(1, 5, 10)]
    # Request 1's last 2 tokens, then request 2 in the rest (1 decode row is not yet due).
    assert chunks[2] == [(1, 10, 12), (2, 0, 2)]


def test_prompts_progress_while_decode_rows_fill_the_budget() -> None:
    s = make(num_slots=8, max_batch_size=8, token_budget=4, chunked_prefill=True)
    for rid in range(1, 5):
        s.add(gen(rid, prompt_len=1, steps=30))
    run_step(s)  # four samples decode: they alone fill the budget
    s.add(gen(9, prompt_len=5))
    assert prompt_chunks(s, 9, 5) == [
        (0, 1, False),
        (1, 2, False),
        (2, 3, False),
        (3, 4, False),
        (4, 5, True),
    ]  # a quarter of 4 each step


def test_without_chunking_a_prompt_waits_for_room_or_runs_alone() -> None:
    s = make(num_slots=4, token_budget=6)
    s.add(gen(1, prompt_len=4))
    s.add(gen(2, prompt_len=4))
    out, _, _ = run_step(s)
    assert [(w.request_id, w.final) for w in out.prefills] == [(1, True)]  # 4 + 4 > 6
    out, _, _ = run_step(s)  # 1 decode row + 4 prompt tokens fit
    assert [w.request_id for w in out.prefills] == [2]


def test_aborting_a_request_between_its_chunks_frees_its_slots() -> None:
    s = make(num_slots=2, token_budget=4, chunked_prefill=True)
    s.add(gen(1, prompt_len=10, samples=2))
    run_step(s)
    assert s.num_free_slots == 0
    assert s.abort(1, CancelledError("gone"))
    out, _, _ = run_step(s)
    assert [a.request_id for a in out.aborted] == [1] and not out.prefills
    assert s.num_free_slots == 2 and not s.has_work()


# The paged KV cache: blocks shared by samples, the prefix cache, preemption.


def paged(num_blocks: int = 16, **kwargs: int | bool) -> Scheduler:
    kwargs.setdefault("max_queue", 8)
    kwargs.setdefault("max_batch_size", 8)
    return Scheduler(
        4,
        32,
        block_size=4,
        num_blocks=num_blocks,
        chunked_prefill=True,
        **kwargs,  # type: ignore[arg-type]
    )


def prompt_of(n: int, first: int = 1) -> Request:
    return Request(
        request_id=first,
        kind=RequestKind.GENERATE,
        prompt=tuple(range(first * 100, first * 100 + n)),
        samples=(SampleOptions(),),
        max_decode_steps=4,
    )


def test_samples_share_the_prompts_full_blocks_and_copy_its_partial_one() -> None:
    s = paged()
    s.add(gen(1, prompt_len=6, samples=3, steps=2))
    out = s.schedule(0.0)
    (work,) = out.prefills
    assert len(work.blocks) == 2 and len(work.forks) == 2
    assert all(f[0] == work.blocks[0] and f[1] != work.blocks[1] for f in work.forks)
    assert [(c.src, c.length) for c in work.copies] == [(work.blocks[1], 2)] * 2
    assert s.pool.refs(work.blocks[0]) == 3 and s.pool.num_free == 16 - 4
    s.update(out, dict.fromkeys(work.sampled_keys, 7), {})
    # The first decode of each sample writes position 6, inside its own second block.
    out = s.schedule(0.0)
    assert [b[1] for b in out.decodes[0].blocks] == [work.blocks[1], *(f[1] for f in work.forks)]
    s.update(out, dict.fromkeys(out.decodes[0].keys, 7), {})  # two tokens each: done
    assert s.num_running == 0 and s.pool.num_free == 16


def test_a_block_aligned_prompt_is_shared_whole_and_each_sample_grows_its_own() -> None:
    s = paged()
    s.add(gen(1, prompt_len=8, samples=2, steps=3))
    out = s.schedule(0.0)
    (work,) = out.prefills
    assert work.forks == (work.blocks,) and work.copies == ()
    s.update(out, dict.fromkeys(work.sampled_keys, 7), {})
    out = s.schedule(0.0)  # position 8 opens a third block for each sample
    tables = out.decodes[0].blocks
    assert [t[:2] for t in tables] == [work.blocks] * 2 and tables[0][2] != tables[1][2]


def test_a_shared_prefix_is_prefilled_once() -> None:
    s = paged()
    s.add(prompt_of(10))
    out, _, _ = run_step(s)
    first = out.prefills[0].blocks
    while s.has_work():
        run_step(s)
    assert s.pool.num_cached == 2  # the prompt's two full blocks stay cached after it ended
    # The same ten tokens again: the first two blocks (8 positions) come from the cache.
    again = dataclasses.replace(prompt_of(10), request_id=2)
    s.add(again)
    out, _, _ = run_step(s)
    (work,) = out.prefills
    assert work.start == 8 and work.blocks[:2] == first[:2] and work.tokens == again.prompt
    assert (s.pool.stats().queried_tokens, s.pool.stats().hit_tokens) == (20, 8)
    # A prompt that diverges in its second block reuses only the first.
    other = Request(3, RequestKind.GENERATE, (*again.prompt[:5], 0, 0, 0, 0), (SampleOptions(),), 2)
    s.add(other)
    out, _, _ = run_step(s)
    assert [w.start for w in out.prefills if w.request_id == 3] == [4]


def test_without_prefix_caching_every_prompt_runs_whole() -> None:
    s = paged(prefix_caching=False)
    for rid in (1, 2):
        s.add(dataclasses.replace(prompt_of(10), request_id=rid))
        out, _, _ = run_step(s)
        assert [w.start for w in out.prefills if w.request_id == rid] == [0]


def test_preemption_when_blocks_run_out_loses_no_token() -> None:
    """Two requests that outgrow a 6-block cache: the newer is preempted, waits at the head of
    the queue, refills its prompt and what it had generated (sampling nothing), and both end
    with every token they were owed."""
    s = paged(num_blocks=6)
    for rid in (1, 2):
        s.add(
            Request(
                rid,
                RequestKind.GENERATE,
                tuple(range(rid * 10, rid * 10 + 4)),
                (SampleOptions(),),
                max_decode_steps=12,
            )
        )
    made: dict[int, list[int]] = {1: [], 2: []}
    refills: list[PrefillWork] = []
    for _ in range(80):
        if not s.has_work():
            break
        out = s.schedule(0.0)
        assert out.aborted == ()
        refills += [w for w in out.prefills if w.resume]
        keys = [k for w in out.prefills for k in w.sampled_keys]
        keys += [k for b in out.decodes for k in b.keys]
        tokens = {k: 1000 * k[0] + len(made[k[0]]) for k in keys}
        for k in keys:
            made[k[0]].append(tokens[k])
        s.update(out, tokens, {})
    assert not s.has_work() and s.preemptions >= 1
    assert made == {rid: [1000 * rid + i for i in range(12)] for rid in (1, 2)}
    assert refills and all(w.request_id == 2 for w in refills)
    # A refill is the prompt and the tokens generated before the preemption but the last.
    w = refills[0]
    assert w.tokens[:4] == (20, 21, 22, 23) and list(w.tokens[4:]) == made[2][: len(w.tokens) - 4]
    assert s.pool.num_free == 6


def test_a_request_that_could_outgrow_the_cache_is_refused() -> None:
    s = paged(num_blocks=4)
    with pytest.raises(InvalidArgumentError, match="may need 6 KV cache blocks"):
        s.add(gen(1, prompt_len=4, samples=2, steps=8))


def test_abort_of_a_preempted_request_releases_its_samples() -> None:
    s = paged(num_blocks=6)
    for rid in (1, 2):
        s.add(Request(rid, RequestKind.GENERATE, (1, 2, 3, 4), (SampleOptions(),), 12))
    for _ in range(40):
        out = s.schedule(0.0)
        keys = [k for w in out.prefills for k in w.sampled_keys]
        keys += [k for b in out.decodes for k in b.keys]
        s.update(out, dict.fromkeys(keys, 7), {})
        if s.preemptions:
            break
    assert s.preemptions == 1 and s.num_waiting == 1
    assert s.abort(2, CancelledError("gone"))
    out = s.schedule(0.0)
    assert [a.request_id for a in out.aborted] == [2] and (2, 0) in out.released


def speculating(rid: int, prompt: tuple[int, ...], steps: int, k: int = 3) -> Request:
    return Request(
        rid,
        RequestKind.GENERATE,
        prompt,
        (SampleOptions(),),
        max_decode_steps=steps,
        speculative_tokens=k,
    )


def test_a_repeating_sequence_is_verified_and_every_kept_token_advances_it() -> None:
    s = paged(speculation=True)
    s.add(speculating(1, (1, 2, 3, 1, 2), steps=8))
    out = s.schedule(0.0)
    s.update(out, {(1, 0): 3}, {})  # the sequence is 1 2 3 1 2 3: "1 2 3" came before
    out = s.schedule(0.0)
    assert out.decodes == ()
    (v,) = out.verifies
    assert (v.key, v.tokens, v.draft, v.position, v.end) == ((1, 0), (3, 1, 2, 3), (1, 2, 3), 5, 9)
    assert len(v.blocks) * 4 >= v.end  # blocks for the whole draft
    assert step_tokens(out) + len(v.tokens) == 4
    # The model kept two draft tokens and made its own third: three tokens, position 8.
    result = s.update(out, {(1, 0): (1, 2, 9)}, {})
    assert result.finished == ()
    out = s.schedule(0.0)  # no tail of "... 3 1 2 9" came before: a plain decode row
    assert out.verifies == () and out.decodes[0].positions == (8,)
    s.update(out, {(1, 0): 1}, {})
    out = s.schedule(0.0)
    s.update(out, {(1, 0): 2}, {})
    # "1 2" came before, followed by "9 1 2", but two decode steps are left: one draft token.
    out = s.schedule(0.0)
    (v,) = out.verifies
    assert (v.tokens, v.position) == ((2, 9), 10)
    result = s.update(out, {(1, 0): (9, 4)}, {})
    assert [(f.key, f.reason) for f in result.finished] == [((1, 0), FinishReason.LENGTH)]
    assert result.done == (1,) and s.pool.num_free == 16


def test_a_draft_takes_no_block_a_growing_sample_may_need() -> None:
    s = paged(num_blocks=3, speculation=True)
    s.add(speculating(1, (1, 2, 3, 1, 2), steps=7))
    out = s.schedule(0.0)
    s.update(out, {(1, 0): 3}, {})
    out = s.schedule(0.0)
    # The draft "1 2 3" would need the last free block: it keeps to the two it holds.
    (v,) = out.verifies
    assert v.draft == (1, 2) and len(v.blocks) == 2 and s.pool.num_free == 1


def test_without_speculation_or_a_match_samples_decode_one_token() -> None:
    # A runner that cannot verify: the request's speculative_tokens are ignored. With one,
    # "... 1 2 4" has no earlier tail to follow.
    for speculation, token in ((False, 3), (True, 4)):
        s = paged(speculation=speculation)
        s.add(speculating(1, (1, 2, 3, 1, 2), steps=8))
        out = s.schedule(0.0)
        s.update(out, {(1, 0): token}, {})
        out = s.schedule(0.0)
        assert out.verifies == () and out.decodes[0].keys == ((1, 0),)
