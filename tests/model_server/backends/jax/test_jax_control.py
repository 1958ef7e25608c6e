"""The control channel between process 0 and its followers (`multihost`: gRPC streams on
127.0.0.1), with stand-in runners, and the one-line error of `python -m model_server` when
`jax.distributed` cannot start."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from model_server.__main__ import main
from model_server.backends.jax import multihost
from model_server.backends.jax.multihost import FollowerChannel, Leader, MultihostConfig, follow
from sax.errors import FailedPreconditionError, InternalError, UnavailableError

LOGGER = "model_server.backends.jax.multihost"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RecordingRunner:
    """Stands in for a follower's runner: records the calls it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def prefill_logits(self, slot: int, tokens: Any, *, all_logits: bool = True) -> None:
        self.calls.append(("prefill", slot, list(tokens), all_logits))

    def decode_logits(self, slots: Any, tokens: Any, positions: Any) -> None:
        self.calls.append(("decode", list(slots), list(tokens), list(positions)))

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if src < 0:
            raise ValueError("bad slot")
        self.calls.append(("copy_slot", src, dst, length))

    def close(self) -> None:
        self.calls.append(("close",))


def _never_built(*args: Any) -> RecordingRunner:
    raise AssertionError("no runner should be built")


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


@pytest.fixture
def group() -> MultihostConfig:
    """Process 0's settings of a two-process server with a free control port."""
    return MultihostConfig("127.0.0.1:1", 2, 0, control_port=_free_port())


def _follower(config: MultihostConfig, process: int = 1) -> MultihostConfig:
    return dataclasses.replace(config, process_id=process)


def _leader_and_follower(pool, group, build=_never_built) -> tuple[Leader, Any]:
    """Process 0's end and a following thread (its future gives `follow`'s exit status)."""
    leader = pool.submit(Leader, group, 30)
    status = pool.submit(follow, _follower(group), build, 30)
    return leader.result(30), status


def _leader_and_channel(pool, group) -> tuple[Leader, FollowerChannel]:
    """Process 0's end and a bare follower channel driven by the test."""
    leader = pool.submit(Leader, group, 30)
    channel = FollowerChannel(_follower(group), 30)
    return leader.result(30), channel


def test_calls_reach_the_follower_runner(pool, group, tiny_config, tiny_checkpoint) -> None:
    runner = RecordingRunner()
    built = []

    def build(config: Any, ckpt: Any, num_slots: int | None) -> RecordingRunner:
        built.append((config, ckpt.path, num_slots))
        return runner

    leader, status = _leader_and_follower(pool, group, build)
    try:
        assert leader.load(3, tiny_config, tiny_checkpoint, 2, lambda: "here") == "here"
        assert built == [(tiny_config, tiny_checkpoint, 2)]
        message = {"op": "prefill", "id": 3, "slot": 1, "tokens": [5, 6], "all_logits": False}
        assert leader.step(message, lambda: 42) == 42
        leader.step({"op": "decode", "id": 3, "slots": [0], "tokens": [7], "positions": [2]}, int)
        leader.step({"op": "copy_slot", "id": 3, "src": 0, "dst": 1, "length": 2}, int)
        with pytest.raises(InternalError, match=r"copy_slot failed on process 1: ValueError"):
            leader.step({"op": "copy_slot", "id": 3, "src": -1, "dst": 1, "length": 2}, int)
        leader.step({"op": "close", "id": 3}, int)
        assert runner.calls == [
            ("prefill", 1, [5, 6], False),
            ("decode", [0], [7], [2]),
            ("copy_slot", 0, 1, 2),
            ("close",),
        ]
    finally:
        leader.close()
    assert status.result(30) == 0 and leader.lost == ""


def test_follower_exits_0_on_shutdown(pool, group) -> None:
    leader, status = _leader_and_follower(pool, group)
    try:
        message = {"op": "prefill", "id": 7, "slot": 0, "tokens": [1], "all_logits": False}
        for _ in range(2):  # no runner 7: reported, and the follower goes on following
            with pytest.raises(InternalError, match="prefill failed on process 1: KeyError"):
                leader.step(message, lambda: None)
    finally:
        leader.close()
    assert status.result(30) == 0


def test_a_checkpoint_a_follower_cannot_open_fails_the_load(pool, group, tiny_config) -> None:
    leader, status = _leader_and_follower(pool, group)
    try:
        with pytest.raises(FailedPreconditionError, match="loading failed on process 1"):
            leader.load(1, tiny_config, "/no/such/checkpoint", None, _never_built)
        assert leader.lost == ""
    finally:
        leader.close()
    assert status.result(30) == 0


def test_follower_exits_1_when_process_0_goes_away_during_a_load(pool, group, caplog) -> None:
    leader, status = _leader_and_follower(pool, group)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        leader._broadcast({"op": "load", "id": 1, "config": {"type": "no.such:Config"}})
        (error,) = leader._replies()  # the first phase, reported
        assert "ModuleNotFoundError" in error
        leader._server.stop(None)  # gone before "go" or "abort"
        assert status.result(30) == 1
    assert "process 0 closed the control channel" in caplog.text


def test_leader_keeps_its_own_error_when_a_follower_is_gone(pool, group, caplog) -> None:
    leader, channel = _leader_and_channel(pool, group)

    def follower_dies() -> None:
        channel.receive()  # takes the call, then goes away without replying
        channel.close()

    def local() -> None:
        dying.result(30)
        raise ValueError("local failure")

    dying = pool.submit(follower_dies)
    try:
        with (
            caplog.at_level(logging.ERROR, logger=LOGGER),
            pytest.raises(ValueError, match="local failure"),
        ):
            leader.step({"op": "decode", "id": 1}, local)
        assert "also failed on followers" in caplog.text
        assert "follower process is gone" in caplog.text
    finally:
        leader.close()


def test_a_lost_follower_makes_the_server_not_serving(pool, group, monkeypatch) -> None:
    from model_server.config import ModelServerConfig
    from model_server.server import ModelServer

    leader, channel = _leader_and_channel(pool, group)
    try:
        monkeypatch.setattr(multihost, "_leader", leader)
        server = ModelServer(ModelServerConfig(host="127.0.0.1", port=0))
        assert server.stall_reason() == "" and leader.lost == ""
        channel.close()  # the follower process dies: seen without a call
        deadline = time.monotonic() + 30
        while not leader.lost and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stall_reason().startswith("broken: a follower process is gone")
        with pytest.raises(UnavailableError, match="follower process is gone"):
            leader.step({"op": "decode", "id": 1}, lambda: None)
    finally:
        leader.close()


def test_a_second_follower_of_the_same_process_is_refused(pool, group, caplog) -> None:
    leader, status = _leader_and_follower(pool, group)
    try:
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            assert follow(_follower(group), _never_built, 30) == 1
        assert "process 1 cannot join" in caplog.text and leader.lost == ""
        with pytest.raises(InternalError, match="KeyError"):  # the first one still follows
            leader.step({"op": "close", "id": 9}, lambda: None)
    finally:
        leader.close()
    assert status.result(30) == 0


def test_timeouts_when_the_other_side_never_comes(group) -> None:
    with pytest.raises(UnavailableError, match="only 0 of 1 follower processes connected"):
        Leader(group, 0.3)
    with pytest.raises(UnavailableError, match="cannot reach process 0's control port"):
        follow(_follower(group), _never_built, 0.3)


def test_jax_distributed_error_is_one_line_and_exit_1(capsys) -> None:
    # JAX runs in this process already, so jax.distributed refuses to start.
    status = main(
        [
            "--backend=jax",
            "--platform_chip=h100",
            "--platform_topology=1",
            "--jax_coordinator=127.0.0.1:1",
            "--jax_num_processes=2",
            "--jax_process_id=1",
        ]
    )
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("model_server: error: jax.distributed could not start"), err
    assert err.count("\n") == 1 and "Traceback" not in err
