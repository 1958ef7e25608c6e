"""Model server faults with real processes: killed in the middle of a stream (kill -9), and
stalled (SIGSTOP) while clients generate."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

import sax
from sax.errors import SaxError
from tests.faults.report import record
from tests.integration.cluster import Cluster, wait_for

MODEL = "/sax/test/tiny"
# Long greedy generations (about 0.1 ms per step on a free core), so a stream is still running
# when its server dies.
LONG = "MAX_DECODE_STEPS=100000"


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    c = Cluster(root=str(tmp_path / "sax-root"), workdir=tmp_path)
    r = c.saxutil("create", c.cell)
    assert r.returncode == 0, r.stderr
    yield c
    c.close()


def _options(steps: int, timeout: float) -> sax.ModelOptions:
    options = sax.ModelOptions()
    options.SetExtraInput("temperature", 0.0)
    options.SetExtraInput("per_example_max_decode_steps", float(steps))
    options.SetTimeout(timeout)
    return options


class _EnoughError(Exception):
    """Raised from a stream callback to end a stream that has shown what it had to."""


class Stream:
    """A GenerateStream in a thread: counts responses; records the error that ends it."""

    def __init__(self, lm: sax.LanguageModel, timeout: float = 60) -> None:
        self.items = 0
        self.error: BaseException | None = None
        self.ended_at = 0.0
        self.stop_after = 0  # when > 0: end the stream after that many responses
        self._lm = lm
        self._timeout = timeout
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _callback(self, last: bool, items: list) -> None:
        if not last:
            self.items += 1
            if self.stop_after and self.items >= self.stop_after:
                raise _EnoughError

    def _run(self) -> None:
        try:
            self._lm.GenerateStream("stream", self._callback, _options(100000, self._timeout))
        except _EnoughError:
            pass
        except BaseException as e:  # noqa: BLE001 - recorded for the assertions
            self.error = e
        self.ended_at = time.monotonic()


class GenerateLoop:
    """Calls Generate in a thread until stopped; counts successes and failures."""

    def __init__(self, lm: sax.LanguageModel, timeout: float) -> None:
        self._lm = lm
        self._timeout = timeout
        self._stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.slowest = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                assert self._lm.Generate("Q: hi? A:", _options(4, self._timeout))
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - recorded for the assertions
                self.errors.append(repr(e))
            self.slowest = max(self.slowest, time.monotonic() - start)
            time.sleep(0.02)

    def __enter__(self) -> GenerateLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _publish(c: Cluster, replicas: int, *overrides: str) -> None:
    r = c.saxutil("publish", MODEL, "test.TinyLM", "None", str(replicas), *overrides)
    assert r.returncode == 0, r.stderr
    wait_for(
        lambda: len(c.ready_addresses(MODEL)) == replicas,
        30,
        f"{replicas} replicas",
        interval=0.1,
    )


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_stream(cluster: Cluster, monkeypatch) -> None:
    c = cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    c.start_admin("--poll_period_s=0.5", "--dead_after_s=3")
    servers = {p.address: p for p in (c.start_model_server(), c.start_model_server())}
    _publish(c, 2, LONG)
    lm = sax.Model(MODEL).LM()
    # Two streams: round-robin puts one on each replica.
    streams = [Stream(lm), Stream(lm)]
    wait_for(lambda: all(s.items >= 20 for s in streams), 30, "both streams to run")
    victim = next(iter(servers.values()))
    with GenerateLoop(lm, timeout=20) as loop:
        killed_at = time.monotonic()
        victim.kill(signal.SIGKILL)
        wait_for(lambda: any(s.error is not None for s in streams), 20, "a stream to fail")
        broken = next(s for s in streams if s.error is not None)
        survivor = next(s for s in streams if s is not broken)
        error_s = broken.ended_at - killed_at
        # The other stream goes on; end it once it has shown that.
        survivor.stop_after = survivor.items + 20
        survivor.thread.join(60)
        wait_for(
            lambda: victim.address not in c.ready_addresses(MODEL), 20, "the dead replica dropped"
        )
        dropped_s = time.monotonic() - killed_at
        ok_at_drop = loop.ok
        wait_for(lambda: loop.ok >= ok_at_drop + 5, 30, "calls after the drop")
    assert isinstance(broken.error, SaxError), repr(broken.error)
    assert broken.error.code.name in ("UNAVAILABLE", "CANCELLED", "ABORTED"), repr(broken.error)
    assert survivor.error is None and not survivor.thread.is_alive(), repr(survivor.error)
    assert error_s < 5, error_s
    assert loop.errors == [], loop.errors[:3]
    record(
        "model server killed (kill -9) in the middle of a stream",
        "the stream on it ends at once with UNAVAILABLE (a SaxError); the stream on the other "
        "replica goes on; new calls retry on the other replica and succeed; the admin drops "
        "the dead server",
        {
            "stream error after": f"{error_s:.2f} s ({broken.error.code.name})",
            "dead replica dropped by the admin after": f"{dropped_s:.1f} s (dead_after 3 s)",
            "requests failed": f"1 stream (the one on the killed server); "
            f"0 of {loop.ok} Generate calls",
            "slowest Generate during the kill": f"{loop.slowest:.2f} s",
        },
        test="tests/faults/test_model_server_faults.py::test_kill_9_in_the_middle_of_a_stream",
    )


@pytest.mark.slow
def test_stalled_server_is_dropped_and_rejoins(cluster: Cluster, monkeypatch) -> None:
    c = cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    c.start_admin("--poll_period_s=0.5", "--poll_timeout_s=1", "--dead_after_s=3")
    procs = [c.start_model_server(), c.start_model_server()]
    _publish(c, 2)
    spare = c.start_model_server()
    lm = sax.Model(MODEL).LM()
    with GenerateLoop(lm, timeout=10) as loop:
        wait_for(lambda: loop.ok >= 5, 30, "calls to succeed")
        victim = procs[0]
        other = procs[1]
        stopped_at = time.monotonic()
        victim.kill(signal.SIGSTOP)
        try:
            wait_for(
                lambda: victim.address not in c.server_addresses(),
                20,
                "the stalled server to be dropped",
                interval=0.1,
            )
            detect_s = time.monotonic() - stopped_at
            wait_for(
                lambda: sorted(c.ready_addresses(MODEL)) == sorted([other.address, spare.address]),
                30,
                "the replica to move to the spare server",
                interval=0.1,
            )
            moved_s = time.monotonic() - stopped_at
            ok_at_move = loop.ok
            wait_for(lambda: loop.ok >= ok_at_move + 5, 30, "calls after the move")
        finally:
            victim.kill(signal.SIGCONT)
        continued_at = time.monotonic()
        wait_for(lambda: victim.address in c.server_addresses(), 20, "the server to rejoin")
        rejoin_s = time.monotonic() - continued_at
        # It rejoins holding a replica the admin placed elsewhere meanwhile: the admin adopts it
        # and drops the surplus, so 2 replicas stay loaded in all.
        three = (victim, other, spare)

        def settled() -> bool:
            loaded = sum(bool(c.server_status(p.address).models) for p in three)
            return len(c.ready_addresses(MODEL)) == 2 and loaded == 2

        wait_for(settled, 30, "2 replicas in all after the rejoin")
        settled_s = time.monotonic() - continued_at
        ok_now = loop.ok
        wait_for(lambda: loop.ok >= ok_now + 5, 30, "calls after the rejoin")
    assert victim.alive()
    failed = len(loop.errors)
    # Only calls that were already waiting on the stalled server may fail (at their deadline).
    assert failed <= 2, loop.errors
    record(
        "model server stalled (SIGSTOP)",
        "the admin drops it after dead_after and places its replica on a spare server; calls "
        "already waiting on it end at their deadline, others go to the other replica; after "
        "SIGCONT it rejoins, its replica is adopted and the surplus one unloaded",
        {
            "detected (dropped) after": f"{detect_s:.1f} s (dead_after 3 s)",
            "replica moved after": f"{moved_s:.1f} s",
            "rejoined after SIGCONT": f"{rejoin_s:.1f} s (2 replicas in all after "
            f"{settled_s:.1f} s)",
            "requests failed": f"{failed} of {loop.ok + failed} Generate calls (deadline 10 s)",
        },
        test="tests/faults/test_model_server_faults.py::test_stalled_server_is_dropped_and_rejoins",
    )
