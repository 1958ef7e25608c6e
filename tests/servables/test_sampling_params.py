"""SamplingParams for the engine: top_k, top_p, repetition_penalty, stop strings, and the call's
deadline and cancel event (which TinyLM honors too)."""

from __future__ import annotations

import threading
import time

import pytest

from model_server.loader import build_servable
from sax.errors import CancelledError, DeadlineExceededError, InvalidArgumentError
from servables import registry
from servables.sampling_params import SamplingParams, parse_stop
from tests.model_server.conftest import wait_for
from tests.model_server.engine.fakes import FakeLMConfig, params

CONFIG = FakeLMConfig()


def test_engine_keys_and_their_defaults() -> None:
    p = SamplingParams.defaults(CONFIG)
    assert (p.top_k, p.top_p, p.repetition_penalty, p.stop) == (0, 1.0, 1.0, ())
    assert (p.deadline, p.cancel) == (None, None) and not p.cancelled()
    p = params(CONFIG, top_k=40, top_p=0.75, repetition_penalty=1.25, stop="\n")
    assert (p.top_k, p.top_p, p.repetition_penalty, p.stop) == (40, 0.75, 1.25, ("\n",))
    assert SamplingParams.defaults(CONFIG).speculative_tokens == 0
    assert params(CONFIG, speculative_tokens=16).speculative_tokens == 16


@pytest.mark.parametrize(
    "items",
    [
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"speculative_tokens": 17},
        {"speculative_tokens": 1.5},
        {"top_k": "3"},
        {"nucleus": 0.5},
    ],
)
def test_bad_engine_values_are_invalid_argument(items: dict[str, float | str]) -> None:
    with pytest.raises(InvalidArgumentError):
        params(CONFIG, **items)


def test_stop_strings() -> None:
    assert parse_stop("") == ()
    assert parse_stop("END") == ("END",)
    assert parse_stop('["\\n\\n", "User:", ""]') == ("\n\n", "User:")
    assert parse_stop("[not json") == ("[not json",)
    assert parse_stop("[1, 2]") == ("[1, 2]",)
    with pytest.raises(InvalidArgumentError, match="must be a string"):
        parse_stop(1.0)


def test_for_call_keeps_the_inputs() -> None:
    p = params(CONFIG, temperature=0.5)
    cancel = threading.Event()
    q = p.for_call(123.0, cancel)
    assert q.temperatures == p.temperatures and q.deadline == 123.0 and q.cancel is cancel
    assert not q.cancelled()
    cancel.set()
    assert q.cancelled()


def test_tiny_stops_on_cancel_and_fails_past_its_deadline() -> None:
    tiny_config = registry.get("test.TinyLM")
    model = build_servable(tiny_config, "None")
    base = SamplingParams.defaults(tiny_config)
    cancel = threading.Event()
    stream = model.generate_stream("hi", base.for_call(None, cancel))
    assert next(stream)
    cancel.set()
    with pytest.raises(CancelledError):
        list(stream)
    # A cancel the engine sees only after the whole continuation is made (a fast model, a slow
    # reader) still ends the caller's stream with CancelledError.
    cancel = threading.Event()
    stream = model.generate_stream("hi", base.for_call(None, cancel))
    assert next(stream)
    wait_for(lambda: model.stats().running == 0, what="the continuation finished")
    cancel.set()
    with pytest.raises(CancelledError):
        list(stream)
    with pytest.raises(DeadlineExceededError):
        model.generate("hi", base.for_call(time.monotonic() - 1, None))
    model.close()
