"""The control channel between process 0 and its followers (model_server/multihost.py) over
real sockets on 127.0.0.1, and the one-line error of `python -m model_server` when
`jax.distributed` cannot start."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import socket
from collections.abc import Iterator

import pytest

from model_server.__main__ import main
from model_server.multihost import Leader, MultihostConfig, _connect, _recv, _send, follow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        yield executor


def _group(control_port: int) -> MultihostConfig:
    return MultihostConfig("127.0.0.1:1", 2, 1, control_port=control_port)


def _process_0(pool: concurrent.futures.ThreadPoolExecutor):
    """A listening control port and a follower (`follow`) connected to it in a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]
    status = pool.submit(follow, _group(port), 30)
    conn, _ = listener.accept()
    listener.close()
    conn.settimeout(30)
    assert _recv(conn) == {"process_id": 1}
    return conn, status


def test_follower_exits_0_on_shutdown(pool) -> None:
    conn, status = _process_0(pool)
    with conn:
        _send(conn, {"op": "prefill", "id": 7, "slot": 0, "tokens": [1], "all_logits": False})
        assert "KeyError" in _recv(conn)["error"]  # no runner 7: reported, still following
        _send(conn, {"op": "shutdown"})
        assert status.result(30) == 0


def test_follower_exits_1_when_process_0_goes_away_during_a_load(pool, caplog) -> None:
    conn, status = _process_0(pool)
    with caplog.at_level(logging.ERROR, logger="model_server.multihost"), conn:
        _send(conn, {"op": "load", "id": 1, "config": {"type": "no.such:Config", "fields": {}}})
        assert "ModuleNotFoundError" in _recv(conn)["error"]  # first phase, reported
        conn.close()  # gone before "go" or "abort"
        assert status.result(30) == 1
    assert "process 0 closed the control channel" in caplog.text


def test_leader_keeps_its_own_error_when_a_follower_is_gone(pool, caplog) -> None:
    port = _free_port()
    config = MultihostConfig("127.0.0.1:1", 2, 0, control_port=port)
    leader_f = pool.submit(Leader, config, 30)
    sock = _connect(dataclasses.replace(config, process_id=1), 30)  # retries until it listens
    _send(sock, {"process_id": 1})
    leader = leader_f.result(30)

    def follower_dies() -> None:
        _recv(sock)  # takes the call, then goes away without replying
        sock.close()

    def local() -> None:
        dying.result(30)
        raise ValueError("local failure")

    dying = pool.submit(follower_dies)
    with (
        caplog.at_level(logging.ERROR, logger="model_server.multihost"),
        pytest.raises(ValueError, match="local failure"),
    ):
        leader.step({"op": "decode", "id": 1}, local)
    assert "also failed on followers" in caplog.text and "follower process is gone" in caplog.text
    leader.close()


def test_a_lost_follower_makes_the_server_not_serving(pool, monkeypatch) -> None:
    from model_server import multihost
    from model_server.config import ModelServerConfig
    from model_server.server import ModelServer

    port = _free_port()
    config = MultihostConfig("127.0.0.1:1", 2, 0, control_port=port)
    leader_f = pool.submit(Leader, config, 30)
    sock = _connect(dataclasses.replace(config, process_id=1), 30)
    _send(sock, {"process_id": 1})
    leader = leader_f.result(30)
    monkeypatch.setattr(multihost, "_leader", leader)
    server = ModelServer(ModelServerConfig(host="127.0.0.1", port=0))
    assert server.stall_reason() == "" and leader.lost == ""
    sock.close()  # the follower process dies
    with pytest.raises(multihost.UnavailableError, match="follower process is gone"):
        leader.step({"op": "decode", "id": 1}, lambda: None)
    assert server.stall_reason().startswith("broken: a follower process is gone")
    leader.close()


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
