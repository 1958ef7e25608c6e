"""Graceful drain with real processes: SIGTERM to one of two model servers serving SmolLM2 while
clients stream through the `sax` client. The calls in flight finish, new ones go to the other
replica, the admin stops listing the server at once (not at its next poll), and the process
exits with status 0."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import sax
from sax.v1 import admin_pb2
from tests.faults.report import record
from tests.integration.cluster import Cluster, wait_for

MODEL = "/sax/test/smollm2"
OVERRIDES = ("INPUT_SEQ_LEN=64", "BUCKET_KEYS=[64]", "BATCH_SIZE=[1,2,4]", "MAX_DECODE_STEPS=32")
DECODE_STEPS = 24


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(root=str(tmp_path / "sax-root"), workdir=tmp_path)
    r = c.saxutil("create", c.cell)
    assert r.returncode == 0, r.stderr
    yield c
    c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples at http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


class StreamClients:
    """Threads that call GenerateStream through the sax client until stopped."""

    def __init__(self, n: int) -> None:
        self._lm = sax.Model(MODEL).LM()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.ok = 0
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        options = sax.ModelOptions()
        options.SetTimeout(60)
        options.SetExtraInput("per_example_max_decode_steps", DECODE_STEPS)
        while not self._stop.is_set():
            pieces: list[int] = []
            try:
                self._lm.GenerateStream(
                    "Once upon a time", lambda last, items, p=pieces: p.append(1), options
                )
                assert len(pieces) >= 2
                with self._lock:
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 - counted and shown by the assertion
                with self._lock:
                    self.errors.append(repr(e))

    def __enter__(self) -> StreamClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


class AddressLog:
    """Follows the admin's WatchLoc for MODEL and keeps (monotonic time, addresses) per update."""

    def __init__(self, c: Cluster) -> None:
        self.updates: list[tuple[float, list[str]]] = []
        self._call = c.admin_stub().WatchLoc(admin_pb2.WatchLocRequest(model_id=MODEL))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for response in self._call:
                self.updates.append((time.monotonic(), sorted(response.addresses)))
        except grpc.RpcError:
            pass

    def first_without(self, address: str, after: float) -> float | None:
        for at, addresses in self.updates:
            if at >= after and address not in addresses:
                return at
        return None

    def close(self) -> None:
        self._call.cancel()


@pytest.mark.slow
def test_sigterm_drains_a_model_server(
    cluster: Cluster, smollm2_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    admin_port = free_port()
    # Default poll period (2 s) and dead-server timeout (10 s): a drop under a second can only
    # come from the server telling the admin.
    c.start_admin(f"--metrics_port={admin_port}")
    ports = [free_port(), free_port()]
    servers = [c.start_model_server("--shutdown_grace_s=30", f"--metrics_port={p}") for p in ports]
    r = c.saxutil("publish", MODEL, "llama.SmolLM2_135M", smollm2_checkpoint, "2", *OVERRIDES)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(c.ready_addresses(MODEL)) == 2, 120, "2 replicas", interval=0.2)
    victim, survivor = servers
    victim_port = ports[0]

    addresses = AddressLog(c)
    try:
        with StreamClients(4) as clients:
            wait_for(lambda: clients.ok >= 4, 120, "the first streams", interval=0.1)
            wait_for(
                lambda: metric(victim_port, "sax_model_server_calls_in_flight") >= 1,
                60,
                "a call in flight on the server to stop",
                interval=0.01,
            )
            sent = time.monotonic()
            victim.popen.send_signal(signal.SIGTERM)
            dropped_at = wait_for(
                lambda: addresses.first_without(victim.address, sent), 10, "the admin to drop it"
            )
            code = victim.popen.wait(timeout=60)
            exited_s = time.monotonic() - sent
            ok_at_exit = clients.ok
            wait_for(lambda: clients.ok >= ok_at_exit + 4, 120, "streams after the drain")
        drop_s = dropped_at - sent
        log = victim.log.read_text()
        in_flight = re.search(r"draining: (\d+) calls in flight", log)
        assert in_flight, log[-3000:]
        assert not clients.errors, clients.errors[:5]
        assert code == 0, log[-3000:]
        assert int(in_flight.group(1)) >= 1
        assert f"drained: the {in_flight.group(1)} calls in flight finished" in log
        # Under the 2 s poll period and far under the 10 s dead-server timeout.
        assert drop_s < 2.0, f"the admin dropped the server {drop_s:.2f} s after SIGTERM"
        assert c.ready_addresses(MODEL) == [survivor.address]
        assert metric(admin_port, "sax_admin_servers_joined") == 1
        assert metric(admin_port, "sax_admin_replicas_ready") == 1
        record(
            "model server drained (SIGTERM)",
            "health NOT_SERVING and a draining Join at once; the admin stops listing it and "
            "clients move to the other replica; calls in flight finish; exit status 0",
            {
                "dropped from WatchLoc": f"{drop_s * 1000:.0f} ms after SIGTERM",
                "calls in flight at SIGTERM": f"{in_flight.group(1)}, all finished",
                "process exit": f"status {code} after {exited_s:.1f} s",
                "client streams failed": f"0 of {clients.ok}",
            },
            test="tests/faults/test_drain.py::test_sigterm_drains_a_model_server",
        )
    finally:
        addresses.close()
