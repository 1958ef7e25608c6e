"""LM RPCs (Generate, GenerateStream, Score) on a loaded test.TinyLM, over gRPC on 127.0.0.1."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
import pytest

from model_server.servable import StreamItem
from model_server.server import ModelServer
from sax.v1 import common_pb2, lm_pb2, lm_pb2_grpc, modelet_pb2, modelet_pb2_grpc
from servables.sampling_params import SamplingParams
from servables.servable_config import ServableConfig

PROMPT = "Q: Who is Harry Potter's mother? A:"


def extra(**items: float) -> common_pb2.ExtraInputs:
    return common_pb2.ExtraInputs(items=items)


def generate(
    lm: lm_pb2_grpc.LMServiceStub, key: str, text: str = PROMPT, **items: float
) -> list[tuple[str, float]]:
    request = lm_pb2.GenerateRequest(model_key=key, text=text, extra_inputs=extra(**items))
    return [(t.text, t.score) for t in lm.Generate(request, timeout=10).texts]


def stream(
    lm: lm_pb2_grpc.LMServiceStub, key: str, text: str = PROMPT, **items: float
) -> tuple[list[str], list[float], int]:
    """Reassembles a stream with Saxml's rule; returns (texts, last scores, number of steps)."""
    request = lm_pb2.GenerateRequest(model_key=key, text=text, extra_inputs=extra(**items))
    texts: list[str] = []
    scores: list[float] = []
    steps = 0
    for response in lm.GenerateStream(request, timeout=10):
        steps += 1
        if not texts:
            texts, scores = [""] * len(response.items), [0.0] * len(response.items)
        for i, item in enumerate(response.items):
            assert item.prefix_len == len(texts[i])  # we never take text back
            texts[i] = texts[i][: item.prefix_len] + item.text
            scores[i] = item.scores[0]
    return texts, scores, steps


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_generate_returns_num_samples_sorted_by_score(
    lm: lm_pb2_grpc.LMServiceStub, tiny: str
) -> None:
    results = generate(lm, tiny, temperature=1.0, seed=11)
    assert len(results) == 2  # test.TinyLM's num_samples
    scores = [s for _, s in results]
    assert scores == sorted(scores, reverse=True)
    for text, score in results:
        assert text and math.isfinite(score) and score < 0


def test_greedy_is_deterministic(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    first = generate(lm, tiny, temperature=0)
    assert first == generate(lm, tiny, temperature=0)
    assert first[0] == first[1]  # every greedy sample is the same
    assert first[0][0]


def test_seeded_sampling_is_deterministic(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    a = generate(lm, tiny, temperature=1.0, seed=5)
    assert a == generate(lm, tiny, temperature=1.0, seed=5)
    assert a != generate(lm, tiny, temperature=1.0, seed=6)


def test_temperature_changes_the_output(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    greedy = generate(lm, tiny, temperature=0)
    hot = generate(lm, tiny, temperature=1.5, seed=5)
    assert {t for t, _ in hot} != {t for t, _ in greedy}
    # Greedy picks the likeliest byte each step: its score beats the sampled ones.
    assert greedy[0][1] > hot[0][1]


def test_per_example_max_decode_steps_caps_length(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    full = generate(lm, tiny, temperature=0)[0][0]
    capped = generate(lm, tiny, temperature=0, per_example_max_decode_steps=3)[0][0]
    assert len(full) > 3
    assert capped == full[:3]
    code = code_of(lambda: generate(lm, tiny, per_example_max_decode_steps=1000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_reassembles_to_the_unary_text(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    unary = generate(lm, tiny, temperature=0)
    texts, scores, steps = stream(lm, tiny, temperature=0)
    assert texts == [unary[0][0]] * 2
    assert scores[0] == pytest.approx(unary[0][1])
    assert steps >= len(texts[0])  # one step per generated token
    # Seeded sampling streams the same samples (in sample order, not sorted).
    sampled = generate(lm, tiny, temperature=1.0, seed=9)
    texts, _, _ = stream(lm, tiny, temperature=1.0, seed=9)
    assert sorted(texts) == sorted(t for t, _ in sampled)


def test_score_one_logp_per_suffix(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    greedy_text, greedy_score = generate(lm, tiny, temperature=0)[0]
    rng = random.Random(0)
    noise = "".join(chr(rng.randrange(32, 127)) for _ in greedy_text)
    request = lm_pb2.ScoreRequest(model_key=tiny, prefix=PROMPT, suffix=[greedy_text, noise, ""])
    logp = list(lm.Score(request, timeout=10).logp)
    assert len(logp) == 3
    assert logp[0] == pytest.approx(greedy_score, rel=1e-5)
    assert logp[0] > logp[1]
    assert logp[2] == 0.0
    empty = lm_pb2.ScoreRequest(model_key=tiny, prefix=PROMPT)
    assert code_of(lambda: lm.Score(empty, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_extra_input_is_invalid_argument(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        generate(lm, tiny, top_k=3)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in e.value.details()
    assert code_of(lambda: stream(lm, tiny, temperature=-1)) == grpc.StatusCode.INVALID_ARGUMENT
    score = lm_pb2.ScoreRequest(model_key=tiny, suffix=["a"], extra_inputs=extra(top_k=1))
    assert code_of(lambda: lm.Score(score, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


def test_prompt_too_long_is_invalid_argument(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    assert code_of(lambda: generate(lm, tiny, text="x" * 300)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stream(lm, tiny, text="x" * 300)) == grpc.StatusCode.INVALID_ARGUMENT


def test_model_not_loaded_is_not_found(lm: lm_pb2_grpc.LMServiceStub, tiny: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        generate(lm, "/sax/test/nothere")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == f"model /sax/test/nothere is not loaded here; loaded: ['{tiny}']"
    assert code_of(lambda: stream(lm, "/sax/test/nothere")) == grpc.StatusCode.NOT_FOUND
    score = lm_pb2.ScoreRequest(model_key="/sax/test/nothere", suffix=["a"])
    assert code_of(lambda: lm.Score(score, timeout=10)) == grpc.StatusCode.NOT_FOUND


def test_streaming_disabled_by_override(
    lm: lm_pb2_grpc.LMServiceStub, modelet: modelet_pb2_grpc.ModeletStub
) -> None:
    key = "/sax/test/nostream"
    modelet.Load(
        modelet_pb2.LoadRequest(
            model_key=key,
            model_path="test.TinyLM",
            checkpoint_path="None",
            overrides={"ENABLE_GENERATE_STREAM": "false"},
        ),
        timeout=30,
    )
    try:
        assert generate(lm, key)
        assert code_of(lambda: stream(lm, key)) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        modelet.Unload(modelet_pb2.UnloadRequest(model_key=key), timeout=10)


class SlowStreamer:
    """A servable whose stream yields a step every 10 ms for up to 1000 steps."""

    method_names = ("lm.generate", "lm.generate_stream", "lm.score")

    def __init__(self) -> None:
        self.steps = 0
        self.closed = threading.Event()

    def generate(self, prompt: str, params: SamplingParams) -> list[tuple[str, float]]:
        return [("", 0.0)]

    def generate_stream(self, prompt: str, params: SamplingParams) -> Iterator[list[StreamItem]]:
        try:
            for i in range(1000):
                time.sleep(0.01)
                self.steps += 1
                yield [StreamItem("x", i, (0.0,))]
        finally:
            self.closed.set()

    def score(self, prefix: str, suffixes: Sequence[str], params: SamplingParams) -> list[float]:
        return [0.0] * len(suffixes)

    def close(self) -> None:
        pass


def test_client_cancel_stops_the_generation(start_server: Callable[..., ModelServer]) -> None:
    slow = SlowStreamer()

    def builder(config: ServableConfig, checkpoint: str) -> SlowStreamer:
        return slow

    server = start_server(builder=builder)
    with grpc.insecure_channel(server.address) as ch:
        modelet_pb2_grpc.ModeletStub(ch).Load(
            modelet_pb2.LoadRequest(model_key="/sax/test/slow", model_path="test.TinyLM"),
            timeout=10,
        )
        call = lm_pb2_grpc.LMServiceStub(ch).GenerateStream(
            lm_pb2.GenerateRequest(model_key="/sax/test/slow", text="hi"), timeout=30
        )
        assert next(call).items[0].text == "x"
        call.cancel()
        assert slow.closed.wait(5), "the generation did not stop after the cancel"
        assert slow.steps < 100
