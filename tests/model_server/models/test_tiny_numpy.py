"""TinyLM in numpy, served by the engine: deterministic weights, decoding rules and scoring."""

from __future__ import annotations

import dataclasses
import math

import pytest

from model_server.loader import build_servable
from model_server.models.tiny_numpy import BOS, ByteTokenizer
from sax.errors import InvalidArgumentError, UnavailableError
from sax.v1 import common_pb2
from servables import registry
from servables.sampling_params import SamplingParams

CONFIG = registry.get("test.TinyLM")


def params(config: object = CONFIG, **items: float) -> SamplingParams:
    return SamplingParams.from_extra_inputs(common_pb2.ExtraInputs(items=items), config)  # type: ignore[arg-type]


def TinyLMServable(config: object) -> object:
    return build_servable(config, "None")  # type: ignore[arg-type]


def test_encode_is_bos_then_utf8_bytes() -> None:
    tok = ByteTokenizer()
    assert tok.encode("hé") == [BOS, 104, 0xC3, 0xA9]
    assert tok.decode(tok.encode("hé")) == "hé"


def test_same_seed_same_model_other_seed_other_model() -> None:
    greedy = params(temperature=0)
    a = TinyLMServable(CONFIG).generate("hello", greedy)
    b = TinyLMServable(CONFIG).generate("hello", greedy)
    c = TinyLMServable(dataclasses.replace(CONFIG, seed=99)).generate("hello", greedy)
    assert a == b
    assert a != c


def test_outputs_are_printable_ascii_and_scores_match_score() -> None:
    model = TinyLMServable(CONFIG)
    results = model.generate("The cat", params(temperature=1.0, seed=3))
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    for text, score, *_ in results:
        assert all(32 <= ord(ch) < 127 for ch in text)
        assert score < 0 and math.isfinite(score)
        assert model.score("The cat", [text], params())[0] == pytest.approx(score, rel=1e-5)


def test_score_of_empty_suffix_is_zero_and_prefix_matters() -> None:
    model = TinyLMServable(CONFIG)
    assert model.score("abc", [""], params()) == [0.0]
    a, b = model.score("abc", ["xyz"], params())[0], model.score("qrs", ["xyz"], params())[0]
    assert a != b


def test_prompt_longer_than_input_seq_len_is_refused() -> None:
    model = TinyLMServable(dataclasses.replace(CONFIG, input_seq_len=8))
    model.generate("x" * 7, params())  # BOS + 7 bytes = 8 tokens
    with pytest.raises(InvalidArgumentError, match="limit of 8 tokens"):
        model.generate("x" * 8, params())
    with pytest.raises(InvalidArgumentError):
        model.score("x" * 8, ["a"], params())


def test_closed_model_refuses_work() -> None:
    model = TinyLMServable(CONFIG)
    model.close()
    with pytest.raises(UnavailableError):
        model.generate("hi", params())
