"""LanguageModel calls: replica discovery by WatchLoc, round-robin, retries, deadlines, streams."""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING

import grpc
import pytest

import sax
from sax import location
from sax.lm import merge_stream_items
from sax.v1 import lm_pb2

if TYPE_CHECKING:
    from conftest import AdminHandle, Cluster

M = "/sax/test/tiny"


def _served_by(lm: sax.LanguageModel, text: str = "q") -> str:
    """The name of the fake replica that answered a Generate."""
    return lm.Generate(text)[0][0].split(":", 1)[0]


def _timeout(seconds: float) -> sax.ModelOptions:
    options = sax.ModelOptions()
    options.SetTimeout(seconds)
    return options


def test_generate_and_score_with_extra_inputs(cluster: Cluster, admin: AdminHandle) -> None:
    fake, _, address = cluster.start_lm("r1")
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [address])
    lm = sax.Model(M).LM()
    options = sax.ModelOptions()
    options.SetExtraInput("temperature", 0.5)
    options.SetExtraInputString("stop", "\n")
    options.SetExtraInputTensor("per_sample", [1.0, 2.0])

    assert lm.Generate("Hi", options) == [("r1:Hi", -1.5), ("r1:alt", -0.5)]
    request = fake.requests[-1]
    assert request.model_key == M
    assert dict(request.extra_inputs.items) == {"temperature": 0.5}
    assert dict(request.extra_inputs.strings) == {"stop": "\n"}
    assert list(request.extra_inputs.tensors["per_sample"].values) == [1.0, 2.0]

    assert lm.Score("prefix", ["a", "bbb"]) == [-1.0, -3.0]
    assert (fake.requests[-1].prefix, list(fake.requests[-1].suffix)) == ("prefix", ["a", "bbb"])
    with pytest.raises(sax.errors.InvalidArgumentError, match="list of strings"):
        lm.Score("prefix", "a")  # type: ignore[arg-type]


def test_round_robin_over_two_replicas(cluster: Cluster, admin: AdminHandle) -> None:
    r1, _, a1 = cluster.start_lm("r1")
    r2, _, a2 = cluster.start_lm("r2")
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1, a2])
    lm = sax.Model(M).LM()
    served = [_served_by(lm) for _ in range(10)]
    assert (r1.calls, r2.calls) == (5, 5)
    assert all(a != b for a, b in itertools.pairwise(served))


def test_address_set_follows_the_watch(cluster: Cluster, admin: AdminHandle) -> None:
    _, _, a1 = cluster.start_lm("r1")
    _, _, a2 = cluster.start_lm("r2")
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1])
    lm = sax.Model(M).LM()
    assert _served_by(lm) == "r1"
    admin.fake.set_addresses(M, [a2])
    deadline = time.monotonic() + 5
    while _served_by(lm) != "r2":
        assert time.monotonic() < deadline, "the client never saw the new address set"
    assert {_served_by(lm) for _ in range(4)} == {"r2"}
    assert location.lookup(sax.naming.parse_model(M)).addresses() == [a2]


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "NOT_FOUND"])
def test_retries_on_another_replica(cluster: Cluster, admin: AdminHandle, code: str) -> None:
    bad, _, a1 = cluster.start_lm("bad")
    good, _, a2 = cluster.start_lm("good")
    bad.always = grpc.StatusCode[code]
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1, a2])
    lm = sax.Model(M).LM()
    assert {_served_by(lm) for _ in range(6)} == {"good"}
    assert bad.calls >= 2 and good.calls == 6


def test_retries_when_a_replica_is_down(cluster: Cluster, admin: AdminHandle) -> None:
    _, down, a1 = cluster.start_lm("down")
    _, _, a2 = cluster.start_lm("up")
    down.stop(0).wait()
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1, a2])
    lm = sax.Model(M).LM()
    assert {_served_by(lm) for _ in range(4)} == {"up"}


def test_errors_that_are_not_retried(cluster: Cluster, admin: AdminHandle) -> None:
    bad, _, a1 = cluster.start_lm("bad")
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1])
    bad.always = grpc.StatusCode.INVALID_ARGUMENT
    lm = sax.Model(M).LM()
    with pytest.raises(sax.errors.InvalidArgumentError, match="injected"):
        lm.Generate("q")
    assert bad.calls == 1

    bad.always = grpc.StatusCode.UNAVAILABLE
    fast = sax.Model(M, sax.Options(fail_fast=True)).LM()
    with pytest.raises(sax.errors.UnavailableError):
        fast.Generate("q")
    assert bad.calls == 2


def test_no_replica_fails_within_the_deadline(admin: AdminHandle) -> None:
    admin.fake.add_model(M, replicas=0)
    lm = sax.Model(M).LM()
    start = time.monotonic()
    with pytest.raises(sax.errors.UnavailableError, match="no replica of /sax/test/tiny"):
        lm.Generate("q", _timeout(0.4))
    assert 0.35 < time.monotonic() - start < 1.4


def test_every_replica_failing_stops_at_the_deadline(cluster: Cluster, admin: AdminHandle) -> None:
    bad, _, a1 = cluster.start_lm("bad")
    bad.always = grpc.StatusCode.UNAVAILABLE
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1])
    start = time.monotonic()
    with pytest.raises((sax.errors.UnavailableError, sax.errors.DeadlineExceededError)):
        sax.Model(M).LM().Generate("q", _timeout(0.5))
    assert time.monotonic() - start < 1.5
    assert bad.calls > 2


def test_waits_for_a_replica_within_the_deadline(cluster: Cluster, admin: AdminHandle) -> None:
    _, _, a1 = cluster.start_lm("r1")
    admin.fake.add_model(M)
    timer = threading.Timer(0.2, admin.fake.set_addresses, (M, [a1]))
    timer.start()
    try:
        assert sax.Model(M).LM().Generate("q", _timeout(5))[0][0] == "r1:q"
    finally:
        timer.join()


def test_unknown_model_fails_fast_then_is_forgotten(
    cluster: Cluster, admin: AdminHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(location, "FORGET_NOT_FOUND_AFTER_S", 0.3)
    lm = sax.Model(M).LM()
    start = time.monotonic()
    with pytest.raises(sax.errors.NotFoundError):
        lm.Generate("q", _timeout(10))
    with pytest.raises(sax.errors.NotFoundError):
        lm.Score("p", ["s"], _timeout(10))
    assert time.monotonic() - start < 2.0

    _, _, a1 = cluster.start_lm("r1")
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1])
    time.sleep(0.35)
    assert _served_by(lm) == "r1"


def test_watch_follows_the_admin_when_it_moves(cluster: Cluster) -> None:
    first = cluster.start_admin("admin-1")
    _, _, a1 = cluster.start_lm("r1")
    _, _, a2 = cluster.start_lm("r2")
    first.fake.add_model(M)
    first.fake.set_addresses(M, [a1])
    lm = sax.Model(M).LM()
    assert _served_by(lm) == "r1"
    first.stop()
    second = cluster.new_admin("admin-2")
    second.add_model(M)
    second.set_addresses(M, [a2])
    cluster.start_admin("admin-2", second)
    deadline = time.monotonic() + 5
    while _served_by(lm) != "r2":
        assert time.monotonic() < deadline, "the watcher did not follow the new admin"


def _item(text: str, prefix_len: int, score: float) -> lm_pb2.GenerateStreamItem:
    return lm_pb2.GenerateStreamItem(text=text, prefix_len=prefix_len, scores=[score])


def _stream_script() -> list[lm_pb2.GenerateStreamResponse]:
    return [
        lm_pb2.GenerateStreamResponse(items=[_item("Hel", 0, -1.0), _item("Wo", 0, -1.0)]),
        lm_pb2.GenerateStreamResponse(items=[_item("lo", 3, -2.0), _item("rld", 2, -2.0)]),
        # Sample 0 rewrites its tail: keep "Hell", append "p!".
        lm_pb2.GenerateStreamResponse(items=[_item("p!", 4, -3.0), _item("", 5, -2.5)]),
    ]


def test_generate_stream_reassembly(cluster: Cluster, admin: AdminHandle) -> None:
    fake, _, a1 = cluster.start_lm("r1")
    fake.stream = _stream_script()
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1])
    calls: list[tuple[bool, list]] = []
    texts: list[str] = []

    def callback(last: bool, items: list) -> None:
        calls.append((last, items))
        merge_stream_items(texts, items)

    sax.Model(M).LM().GenerateStream("q", callback)
    assert [last for last, _ in calls] == [False, False, False, True]
    assert calls[0][1] == [("Hel", 0, [-1.0]), ("Wo", 0, [-1.0])]
    assert calls[-1][1] == []
    assert texts == ["Hellp!", "World"]


def test_generate_stream_retries_only_before_the_first_message(
    cluster: Cluster, admin: AdminHandle
) -> None:
    bad, _, a1 = cluster.start_lm("bad")
    good, _, a2 = cluster.start_lm("good")
    bad.always = grpc.StatusCode.UNAVAILABLE
    good.stream = _stream_script()
    admin.fake.add_model(M)
    admin.fake.set_addresses(M, [a1, a2])
    lm = sax.Model(M).LM()
    for _ in range(3):
        got: list[bool] = []
        lm.GenerateStream("q", lambda last, items, got=got: got.append(last))
        assert got == [False, False, False, True]
    assert good.calls == 3

    # A failure after the first message ends the call: no retry, no last=True callback.
    bad.always = None
    for fake in (bad, good):
        fake.stream = _stream_script()[:1]
        fake.stream_error = grpc.StatusCode.INTERNAL
    calls_before = bad.calls + good.calls
    got = []
    with pytest.raises(sax.errors.InternalError, match="stream broke"):
        lm.GenerateStream("q", lambda last, items: got.append(last))
    assert got == [False]
    assert bad.calls + good.calls == calls_before + 1


def test_model_options() -> None:
    options = sax.ModelOptions()
    options.SetExtraInput("t", 1)
    options.SetExtraInputString("t", "x")  # a key lives in one map only
    options.SetExtraInputTensor("v", [1, 2])
    assert options.GetExtraInput("t") == "x"
    assert options.GetExtraInput("v") == [1.0, 2.0]
    assert options.GetExtraInput("missing") is None
    proto = options.ToProto()
    assert (dict(proto.items), dict(proto.strings)) == ({}, {"t": "x"})
    assert options.GetTimeout() == -1
    options.SetTimeout(2.5)
    assert options.GetTimeout() == 2.5
    with pytest.raises(sax.errors.InvalidArgumentError):
        options.SetExtraInput("t", "not a number")  # type: ignore[arg-type]
    import copy

    clone = copy.deepcopy(options)
    clone.SetExtraInput("t", 3.0)
    assert options.GetExtraInput("t") == "x"


def test_bad_model_id() -> None:
    with pytest.raises(sax.errors.InvalidArgumentError, match="invalid model id"):
        sax.Model("tiny")
