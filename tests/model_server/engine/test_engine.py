"""The engine core and EngineServable over a fake runner: correctness under continuous batching,
ordering, limits, cancellation, deadlines, sampling inputs, scores and shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from model_server.backends.host_sampling import log_softmax
from model_server.engine.engine import Engine
from model_server.engine.engine_servable import EngineServable
from model_server.engine.request import (
    FinishReason,
    Request,
    RequestKind,
    RequestOutput,
    SampleOptions,
)
from model_server.engine.tokenizer import Tokenizer
from model_server.servable import AsyncServable, StreamItem
from sax.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tests.model_server.conftest import wait_for
from tests.model_server.engine.fakes import (
    EOS,
    FakeLMConfig,
    FakeRunner,
    build_servable,
    context_hashes,
    logits_after,
    params,
    reference_greedy,
    write_tokenizer,
)

CONFIG = FakeLMConfig()


@pytest.fixture
def parts(tmp_path: pathlib.Path) -> Iterator[tuple[EngineServable, FakeRunner, Tokenizer]]:
    servable, runner, tok = build_servable(tmp_path)
    yield servable, runner, tok
    servable.close()


@pytest.fixture
def gated(
    tmp_path: pathlib.Path,
) -> Iterator[tuple[EngineServable, FakeRunner, threading.Semaphore]]:
    """A servable whose decode steps each wait for a permit from the test."""
    gate = threading.Semaphore(0)
    servable, runner, _ = build_servable(tmp_path, gate=gate)
    yield servable, runner, gate
    gate.release(1000)
    servable.close()


def expected(tok: Tokenizer, prompt: str, steps: int, eos_period: int = 0) -> str:
    out = reference_greedy(tok.encode(prompt), steps, eos_period)
    return tok.decode([t for t in out if t != EOS])


def reassemble(steps: Iterator[list[StreamItem]]) -> list[str]:
    texts: list[str] = []
    for items in steps:
        texts = texts or [""] * len(items)
        for i, item in enumerate(items):
            assert item.prefix_len == len(texts[i])  # text is never taken back
            texts[i] = texts[i][: item.prefix_len] + item.text
    return texts


def test_greedy_generate_stream_and_score_agree_with_the_reference(parts: Any) -> None:
    servable, runner, tok = parts
    assert isinstance(servable, AsyncServable)
    want = expected(tok, "hello", 24)
    ((text, score, *_),) = servable.generate("hello", params(CONFIG))
    assert text == want and len(text) == 24
    assert reassemble(servable.generate_stream("hello", params(CONFIG))) == [want]
    (logp,) = servable.score("hello", [text], params(CONFIG))
    assert logp == pytest.approx(score, abs=1e-4)
    # The score is the sum of log-softmax of the reference logits at each token.
    tokens = tok.encode("hello") + tok.encode(text, add_bos=False)
    hashes = context_hashes(tokens)
    n = len(tok.encode("hello"))
    direct = sum(
        float(log_softmax(logits_after(hashes[p - 1]))[tokens[p]]) for p in range(n, len(tokens))
    )
    assert logp == pytest.approx(direct, abs=1e-4)
    assert servable.score("hello", ["", "zzz"], params(CONFIG))[0] == 0.0
    assert servable.stats().free_slots == runner.num_slots


def test_sixteen_concurrent_streams_of_different_lengths(parts: Any) -> None:
    servable, runner, tok = parts  # 8 slots: half of the requests wait and reuse slots
    cases = [(f"q{'x' * i}?", 4 + (i * 5) % 21) for i in range(16)]

    async def one(prompt: str, steps: int) -> list[str]:
        texts: list[str] = []
        p = params(CONFIG, per_example_max_decode_steps=steps)
        async for items in servable.generate_stream_async(prompt, p):
            texts = texts or [""] * len(items)
            for i, item in enumerate(items):
                assert item.prefix_len == len(texts[i])
                texts[i] = texts[i][: item.prefix_len] + item.text
        return texts

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(one(p, s) for p, s in cases))

    results = asyncio.run(main())
    assert results == [[expected(tok, p, s)] for p, s in cases]
    decodes = [entry[1] for entry in runner.log if entry[0] == "decode"]
    assert max(len(slots) for slots in decodes) == 4  # batched, at most the largest batch size
    assert {s for slots in decodes for s in slots} == set(range(8))
    assert servable.stats().free_slots == 8


def test_a_request_arriving_during_decoding_starts_before_the_running_one_finishes(
    tmp_path: pathlib.Path,
) -> None:
    gate = threading.Semaphore(0)
    runner = FakeRunner(num_slots=4, gate=gate)
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path))
    engine = Engine(runner, decode=tok.decode, eos_ids=[EOS], max_queue=4, max_batch_size=4)
    events: list[tuple[str, RequestOutput]] = []
    lock = threading.Lock()

    def sink(name: str) -> Callable[[RequestOutput], None]:
        def put(output: RequestOutput) -> None:
            with lock:
                events.append((name, output))

        return put

    def request(prompt: str, steps: int) -> Request:
        return Request(
            engine.new_request_id(),
            RequestKind.GENERATE,
            tuple(tok.encode(prompt)),
            samples=(SampleOptions(),),
            max_decode_steps=steps,
        )

    try:
        engine.submit(request("long one", 20), sink("A"))
        wait_for(lambda: events, what="A's first token")  # A is decoding (step 2 waits)
        engine.submit(request("short", 3), sink("B"))
        gate.release(100)
        wait_for(lambda: len([e for e in events if e[1].finished]) == 2, what="both done")
    finally:
        gate.release(100)
        engine.close()
    order = [(name, out.finished) for name, out in events]
    b_first = order.index(("B", False))
    a_done = order.index(("A", True))
    assert order[0] == ("A", False)
    assert b_first < a_done and order.index(("B", True)) < a_done
    texts = {
        name: "".join(s.text for who, o in events if who == name for s in o.samples)
        for name in "AB"
    }
    assert texts == {"A": expected(tok, "long one", 20), "B": expected(tok, "short", 3)}


def test_full_queue_is_resource_exhausted(tmp_path: pathlib.Path) -> None:
    gate = threading.Semaphore(0)
    config = dataclasses.replace(CONFIG, max_queue=2)
    servable, _, _ = build_servable(tmp_path, config, num_slots=1, gate=gate)
    try:
        streams = [servable.generate_stream("a", params(config)) for _ in range(4)]
        assert next(streams[0])  # running (its next decode waits for the gate)
        waiters = [threading.Thread(target=next, args=(s,)) for s in streams[1:3]]
        for w in waiters:
            w.start()
        wait_for(lambda: servable.stats().waiting == 2, what="two waiting")
        with pytest.raises(ResourceExhaustedError, match=r"queue full \(2 waiting\)"):
            next(streams[3])
        gate.release(1000)
        for w in waiters:
            w.join(10)
        assert servable.stats().waiting == 0
    finally:
        gate.release(1000)
        servable.close()


def test_closing_a_stream_frees_its_slot_within_one_step(gated: Any) -> None:
    servable, runner, gate = gated
    stream = servable.generate_stream("abc", params(CONFIG))
    assert next(stream)[0].text
    assert servable.stats().free_slots == runner.num_slots - 1
    stream.close()  # the engine is inside (or about to start) decode step 2
    gate.release(1)  # only that step may run: the abort must free the slot right after it
    wait_for(lambda: servable.stats().free_slots == runner.num_slots, what="the slot back")
    assert servable.stats().running == 0


def test_cancel_event_aborts_a_blocking_generate(gated: Any) -> None:
    servable, runner, gate = gated
    p = params(CONFIG).for_call(None, threading.Event())
    errors: list[BaseException] = []

    def run() -> None:
        try:
            servable.generate("abc", p)
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    wait_for(lambda: servable.stats().running == 1, what="running")
    assert p.cancel is not None
    p.cancel.set()
    gate.release(1)
    worker.join(10)
    assert [type(e) for e in errors] == [CancelledError]
    assert servable.stats().free_slots == runner.num_slots


def test_cancelling_the_coroutine_frees_the_slot(gated: Any) -> None:
    servable, runner, gate = gated

    async def main() -> None:
        task = asyncio.ensure_future(servable.generate_async("abc", params(CONFIG)))
        while servable.stats().running == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    gate.release(1)
    wait_for(lambda: servable.stats().free_slots == runner.num_slots, what="the slot back")


def test_passed_deadline_is_deadline_exceeded(parts: Any) -> None:
    servable, runner, _ = parts
    p = params(CONFIG).for_call(time.monotonic() - 1, None)
    with pytest.raises(DeadlineExceededError, match="deadline passed in the queue"):
        servable.generate("abc", p)
    with pytest.raises(DeadlineExceededError):
        servable.score("abc", ["d"], p)
    assert servable.stats().free_slots == runner.num_slots


def test_prompt_longer_than_the_largest_bucket(tmp_path: pathlib.Path, parts: Any) -> None:
    servable, _, tok = parts
    assert servable.prompt_limit == 32
    servable.generate("x" * 31, params(CONFIG, per_example_max_decode_steps=1))  # BOS + 31
    with pytest.raises(InvalidArgumentError, match="33 tokens, longer than the model's limit of"):
        servable.generate("x" * 32, params(CONFIG))
    with pytest.raises(InvalidArgumentError, match="limit of 32"):
        servable.generate_stream("x" * 40, params(CONFIG))
    config = dataclasses.replace(CONFIG, truncate_prompt=True)
    cut, cut_runner, _ = build_servable(tmp_path / "cut", config)
    try:
        prompt = "".join(chr(ord("a") + i % 26) for i in range(40))
        ((text, *_),) = cut.generate(prompt, params(config, per_example_max_decode_steps=4))
        kept = cut_runner.log[0][2]
        assert len(kept) == 32 and kept[0] == tok.bos_id
        assert tok.decode(kept) == prompt[-31:]
        assert text == tok.decode(reference_greedy(kept, 4))
    finally:
        cut.close()


def test_seed_temperature_top_k_and_repetition_penalty(parts: Any) -> None:
    servable, _, _ = parts

    def text(**items: float) -> str:
        return servable.generate("seeded", params(CONFIG, **items))[0][0]

    greedy = text()
    assert text(temperature=1.0, top_k=1, seed=5) == greedy
    a = text(temperature=1.0, seed=5)
    assert a == text(temperature=1.0, seed=5)
    assert a != text(temperature=1.0, seed=6) and a != greedy
    assert len({text(temperature=1.0) for _ in range(3)}) > 1  # seed 0: fresh each time

    def repeats(s: str) -> int:
        return len(s) - len(set(s))

    penalized = text(repetition_penalty=5.0)
    assert penalized != greedy and repeats(penalized) < repeats(greedy)
    assert repeats(text(temperature=1.0, seed=9, repetition_penalty=5.0)) < repeats(
        text(temperature=1.0, seed=9)
    )


def test_stop_strings(parts: Any) -> None:
    servable, _, tok = parts
    full = expected(tok, "hello", 24)
    stop = full[10:13]
    assert full.index(stop) == 10
    ((text, *_),) = servable.generate("hello", params(CONFIG, stop=stop))
    assert text == full[:10]
    assert reassemble(servable.generate_stream("hello", params(CONFIG, stop=stop))) == [full[:10]]
    many = f'["zzzz", "{full[5:7]}"]'
    assert servable.generate("hello", params(CONFIG, stop=many))[0][0] == full[:5]


def test_token_counts_and_finish_reasons(parts: Any) -> None:
    servable, _, tok = parts
    prompt_tokens = len(tok.encode("hello"))
    (done,) = servable.generate("hello", params(CONFIG, per_example_max_decode_steps=7))
    assert (done.num_tokens, done.finish_reason, done.prompt_tokens) == (7, "length", prompt_tokens)
    assert len(tok.encode(done.text, add_bos=False)) == 7
    steps = list(servable.generate_stream("hello", params(CONFIG, per_example_max_decode_steps=7)))
    counts = [step[0].num_tokens for step in steps]
    assert counts == sorted(counts) and counts[-1] == 7
    assert [step[0].finish_reason for step in steps] == [""] * (len(steps) - 1) + ["length"]
    assert {step[0].prompt_tokens for step in steps} == {prompt_tokens}
    # A stop string ends the text before it; the tokens that made it were still generated.
    full = expected(tok, "hello", 24)
    (stopped,) = servable.generate("hello", params(CONFIG, stop=full[10:13]))
    assert stopped.finish_reason == "stop" and 11 <= stopped.num_tokens < 24


def test_several_samples_share_one_prefill(tmp_path: pathlib.Path) -> None:
    config = dataclasses.replace(CONFIG, num_samples=3)
    servable, runner, _ = build_servable(tmp_path, config)
    try:
        results = servable.generate("many", params(config, temperature=1.0, seed=4))
        assert len(results) == 3 and len({r.text for r in results}) == 3
        assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
        assert [e[0] for e in runner.log[:3]] == ["prefill", "copy", "copy"]
        streamed = reassemble(
            servable.generate_stream("many", params(config, temperature=1.0, seed=4))
        )
        assert sorted(streamed) == sorted(r.text for r in results)
    finally:
        servable.close()


def test_eos_ends_a_sample_without_text_or_score(tmp_path: pathlib.Path) -> None:
    servable, _, tok = build_servable(tmp_path, eos_period=7)
    try:
        lengths = set()
        for prompt in ("a", "bb", "ccc", "dddd", "eeeee"):
            want = reference_greedy(tok.encode(prompt), 24, eos_period=7)
            ((text, score, *_),) = servable.generate(prompt, params(CONFIG))
            assert text == expected(tok, prompt, 24, eos_period=7)
            lengths.add(len(text))
            if want[-1] == EOS:
                logp = servable.score(prompt, [text], params(CONFIG))[0]
                assert logp == pytest.approx(score, abs=1e-4)
        assert min(lengths) < 24  # some ended with EOS
    finally:
        servable.close()


def test_runner_failure_fails_the_step_requests_and_the_engine_goes_on(parts: Any) -> None:
    servable, runner, tok = parts
    runner.fail_decodes = 1
    with pytest.raises(InternalError, match="injected decode failure"):
        servable.generate("boom", params(CONFIG))
    assert servable.generate("fine", params(CONFIG))[0][0] == expected(tok, "fine", 24)
    assert servable.stats().free_slots == runner.num_slots


def test_close_fails_pending_requests_and_refuses_new_ones(gated: Any) -> None:
    servable, runner, gate = gated
    stream = servable.generate_stream("abc", params(CONFIG))
    assert next(stream)
    closer = threading.Thread(target=servable.close)
    closer.start()
    gate.release(1000)
    with pytest.raises(UnavailableError, match="retry on another replica"):
        list(stream)
    closer.join(10)
    assert runner.closed
    with pytest.raises(UnavailableError):
        servable.generate("abc", params(CONFIG))


def test_finish_reasons_reach_the_outputs(tmp_path: pathlib.Path) -> None:
    runner = FakeRunner(num_slots=2)
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path))
    engine = Engine(runner, decode=tok.decode, eos_ids=[EOS], max_queue=4, max_batch_size=2)
    outputs: list[RequestOutput] = []
    done = threading.Event()

    def sink(output: RequestOutput) -> None:
        outputs.append(output)
        if output.finished:
            done.set()

    full = expected(tok, "xy", 6)
    assert full.find(full[3:5]) == 3
    request = Request(
        engine.new_request_id(),
        RequestKind.GENERATE,
        tuple(tok.encode("xy")),
        samples=(SampleOptions(), SampleOptions()),
        max_decode_steps=6,
        stop=(full[3:5],),
    )
    try:
        engine.submit(request, sink)
        assert done.wait(10)
    finally:
        engine.close()
    reasons = [s.finish_reason for o in outputs for s in o.samples if s.finish_reason]
    assert reasons == [FinishReason.STOP, FinishReason.STOP]
    assert outputs[-1].finished and all(len(o.samples) == 2 for o in outputs)
    assert ["".join(o.samples[i].text for o in outputs) for i in (0, 1)] == [full[:3]] * 2


def run_all(
    engine: Engine, requests: list[tuple[tuple[int, ...], int, int, int]]
) -> dict[int, list[RequestOutput]]:
    """Submits (prompt, samples, max decode steps, speculative tokens) greedy requests at once
    and waits for them all; returns each request's outputs by request id (submission order)."""
    outputs: dict[int, list[RequestOutput]] = {}
    lock = threading.Lock()
    for prompt, samples, steps, k in requests:
        rid = engine.new_request_id()
        outputs[rid] = []

        def put(output: RequestOutput, rid: int = rid) -> None:
            with lock:
                outputs[rid].append(output)

        request = Request(
            rid,
            RequestKind.GENERATE,
            prompt,
            samples=(SampleOptions(),) * samples,
            max_decode_steps=steps,
            speculative_tokens=k,
        )
        engine.submit(request, put)
    wait_for(lambda: all(o and o[-1].finished for o in outputs.values()), what="all requests done")
    return outputs


def test_chunked_prefill_gives_the_tokens_of_whole_prompts(tmp_path: pathlib.Path) -> None:
    """With a budget of 6 tokens a step, prompts of 10 to 30 tokens are prefilled in chunks
    beside the running decodes; every text still equals the cache-free reference."""
    runner = FakeRunner(num_slots=4)
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path))
    engine = Engine(
        runner, decode=tok.decode, eos_ids=[EOS], max_queue=8, max_batch_size=4, token_budget=6
    )
    prompts = ["a longer prompt, chunked", "short one", "x" * 30, "the fourth of them"]
    try:
        outputs = run_all(
            engine, [(tuple(tok.encode(p)), 1 + i % 2, 8, 0) for i, p in enumerate(prompts)]
        )
    finally:
        engine.close()
    assert any(entry[0] == "chunk" for entry in runner.log)  # some prompt was split
    for (rid, outs), prompt in zip(sorted(outputs.items()), prompts, strict=True):
        assert all(o.error is None for o in outs)
        samples = len(outs[-1].samples)
        texts = [
            "".join(s.text for o in outs for s in o.samples if s.index == i) for i in range(samples)
        ]
        assert texts == [expected(tok, prompt, 8)] * samples, rid


def quoting(tok: Tokenizer, start: str) -> str:
    """A prompt that quotes what a bigram fake model makes after `start`, then ends like
    `start`: the model's answer repeats the quote, as prompt lookup guesses."""
    made = tok.decode(reference_greedy(tok.encode(start), 12, order=1))
    return start + made + start[-2:]


def test_speculation_gives_the_greedy_tokens_and_keeps_the_drafts_it_agrees_with(
    tmp_path: pathlib.Path,
) -> None:
    """Over a bigram fake model, speculating and plain requests run side by side, one with two
    samples, under a small budget: every text equals the cache-free reference, and drafts were
    kept: a speculating sample got several tokens from one step."""
    runner = FakeRunner(num_slots=6, order=1, eos_period=0)
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path))
    engine = Engine(
        runner, decode=tok.decode, eos_ids=[EOS], max_queue=8, max_batch_size=4, token_budget=10
    )
    cases = [
        (quoting(tok, "loop along"), 4, 1),
        ("plain one", 0, 1),
        (quoting(tok, "two samples"), 8, 2),
        (quoting(tok, "more"), 2, 1),
    ]
    try:
        outputs = run_all(engine, [(tuple(tok.encode(p)), n, 24, k) for p, k, n in cases])
        stats = engine.stats()
    finally:
        engine.close()
    for (rid, outs), (prompt, _, samples) in zip(sorted(outputs.items()), cases, strict=True):
        assert all(o.error is None for o in outs)
        want = reference_greedy(tok.encode(prompt), 24, order=1)
        for i in range(samples):
            text = "".join(s.text for o in outs for s in o.samples if s.index == i)
            assert text == tok.decode(want), (rid, i)
            last = next(s for s in outs[-1].samples if s.index == i)
            assert (last.num_tokens, last.finish_reason) == (24, FinishReason.LENGTH)
            counts = [s.num_tokens for o in outs for s in o.samples if s.index == i]
            jumps = {b - a for a, b in itertools.pairwise([0, *counts])}
            assert (max(jumps) > 1) == (cases[rid - 1][1] > 0), (rid, i)  # kept drafts
    assert 0 < stats.accepted_tokens <= stats.draft_tokens
    assert stats.tokens == 24 * 5


def test_a_stop_string_inside_a_kept_draft_ends_the_sample_there(tmp_path: pathlib.Path) -> None:
    servable, _, tok = build_servable(tmp_path, order=1)
    try:
        prompt = quoting(tok, "loop")
        want = tok.decode(reference_greedy(tok.encode(prompt), 24, order=1))
        stop = want[6:8]  # within the quote, where drafts are kept
        first = want.index(stop)
        ((text, _, *_),) = servable.generate(
            prompt, params(CONFIG, speculative_tokens=6, stop=stop)
        )
        assert text == want[:first]
        assert servable.stats().accepted_tokens > 0
    finally:
        servable.close()
