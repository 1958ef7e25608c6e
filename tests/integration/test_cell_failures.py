"""Acceptance of the control plane with real processes: dead servers, admin restarts, replica
count changes and bad input."""

from __future__ import annotations

import threading
import time

import pytest

import sax
from sax import cell as cell_layout
from sax.naming import parse_cell
from tests.integration.cluster import Cluster, wait_for

MODEL = "/sax/test/tiny"


class GenerateLoop:
    """Calls Generate through the `sax` client in a thread until stopped; counts outcomes."""

    def __init__(self, model_id: str) -> None:
        self._lm = sax.Model(model_id).LM()
        self._stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        options = sax.ModelOptions()
        options.SetTimeout(20)
        while not self._stop.is_set():
            try:
                out = self._lm.Generate("Q: Who is Harry Potter's mother? A:", options)
                assert out
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - recorded for the assertion
                self.errors.append(repr(e))
            time.sleep(0.05)

    def __enter__(self) -> GenerateLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _publish_two(c: Cluster) -> None:
    r = c.saxutil("publish", MODEL, "test.TinyLM", "None", "2")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(c.ready_addresses(MODEL)) == 2, 30, "2 replicas", interval=0.2)


@pytest.mark.slow
def test_dead_server_is_dropped_and_replaced(local_cluster: Cluster, monkeypatch) -> None:
    c = local_cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    c.start_admin()  # default poll period and dead-server timeout
    ms1, ms2 = c.start_model_server(), c.start_model_server()
    _publish_two(c)

    with GenerateLoop(MODEL) as loop:
        wait_for(lambda: loop.ok >= 5, 30, "calls to succeed")
        killed_at = time.monotonic()
        ms1.kill()
        wait_for(
            lambda: (
                c.ready_addresses(MODEL) == [ms2.address]
                and ms1.address not in c.server_addresses()
            ),
            20,
            "the dead server to be dropped",
            interval=0.2,
        )
        detect_s = time.monotonic() - killed_at
        ok_at_drop = loop.ok
        wait_for(lambda: loop.ok >= ok_at_drop + 5, 30, "calls after the drop")
    assert detect_s < 20
    assert loop.errors == [], loop.errors[:3]

    r = c.saxutil("ls", MODEL)
    row = next(line for line in r.stdout.splitlines() if "test.TinyLM" in line)
    assert row.strip("|").split("|")[3].strip() == "1", r.stdout

    ms3 = c.start_model_server()
    wait_for(
        lambda: sorted(c.ready_addresses(MODEL)) == sorted([ms2.address, ms3.address]),
        30,
        "the replica to move to the new server",
        interval=0.2,
    )


@pytest.mark.slow
def test_admin_restart_adopts_without_reload(local_cluster: Cluster, monkeypatch) -> None:
    c = local_cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    admin = c.start_admin()
    port = admin.address.rsplit(":", 1)[1]
    ms = [c.start_model_server(), c.start_model_server()]
    _publish_two(c)
    loads_before = {p.address: c.server_status(p.address).total_loads for p in ms}

    with GenerateLoop(MODEL) as loop:
        wait_for(lambda: loop.ok >= 3, 30, "calls to succeed")
        admin.kill()
        restarted_at = time.monotonic()
        c.start_admin(f"--port={port}")
        wait_for(lambda: len(c.ready_addresses(MODEL)) == 2, 10, "replicas adopted", interval=0.1)
        # A new client (a fresh saxutil process) is answered too.
        r = c.saxutil("lm.generate", MODEL, "Hello")
        answered_s = time.monotonic() - restarted_at
        assert r.returncode == 0, r.stderr + c.logs()
        ok_now = loop.ok
        wait_for(lambda: loop.ok >= ok_now + 3, 30, "calls after the restart")
    assert answered_s < 10, answered_s
    assert loop.errors == [], loop.errors[:3]
    assert sax.ListAll(c.cell) == [MODEL]
    loads_after = {p.address: c.server_status(p.address).total_loads for p in ms}
    assert loads_after == loads_before


@pytest.mark.slow
def test_replica_count_changes_reload_nothing_that_stays(
    local_cluster: Cluster, monkeypatch
) -> None:
    c = local_cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    c.start_admin()
    ms = [c.start_model_server(), c.start_model_server()]
    r = c.saxutil("publish", MODEL, "test.TinyLM", "None", "1")
    assert r.returncode == 0, r.stderr
    first = wait_for(lambda: c.ready_addresses(MODEL), 30, "1 replica", interval=0.2)[0]
    loads = {p.address: c.server_status(p.address).total_loads for p in ms}

    r = c.saxutil("update", "-replicas=2", MODEL)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(c.ready_addresses(MODEL)) == 2, 30, "2 replicas", interval=0.2)
    assert c.server_status(first).total_loads == loads[first]
    second = next(a for a in c.ready_addresses(MODEL) if a != first)

    r = c.saxutil("update", "--replicas=1", MODEL)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(c.ready_addresses(MODEL)) == 1, 30, "1 replica", interval=0.2)
    stay = c.ready_addresses(MODEL)[0]
    assert c.server_status(stay).total_loads == loads[stay] + (1 if stay == second else 0)
    assert c.server_status(first).total_loads == loads[first]
    gone = next(a for a in (first, second) if a != stay)
    wait_for(lambda: c.server_status(gone).total_unloads == 1, 10, "the extra replica to unload")


@pytest.mark.slow
def test_bad_input_is_refused_and_changes_nothing(local_cluster: Cluster, monkeypatch) -> None:
    c = local_cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    c.start_admin()
    r = c.saxutil("publish", MODEL, "test.TinyLM", "None", "1", "BATCH_SIZE=4")
    assert r.returncode == 0, r.stderr
    state_path = "sax/test/" + cell_layout.STATE_FILE
    state_before = c.store.read(state_path)
    list_before = sax.ListDetail(MODEL)

    cases = [
        (["publish", MODEL, "test.TinyLM", "None", "1"], sax.errors.AlreadyExistsError),
        (["unpublish", "/sax/test/nope"], sax.errors.NotFoundError),
        (["update", "-replicas=1", "/sax/test/nope"], sax.errors.NotFoundError),
        (["publish", "/sax/test/Bad!", "test.TinyLM", "None", "1"], None),
        (["publish", "/sax/test/neg", "test.TinyLM", "None", "-1"], None),
        (["publish", "/sax/test/ovr", "test.TinyLM", "None", "1", "NO_SUCH_KEY=1"], None),
        (["publish", "/sax/test/typ", "test.TinyLM", "None", "1", 'BATCH_SIZE="x"'], None),
        (["publish", "/sax/test/cfg", "no.SuchConfig", "None", "1"], None),
        (["update", "-replicas=-3", MODEL], None),
    ]
    for argv, _ in cases:
        r = c.saxutil(*argv)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
        assert r.stdout == "", (argv, r.stdout)

    # The same mistakes through the library give the documented status codes.
    with pytest.raises(sax.errors.AlreadyExistsError):
        sax.Publish(MODEL, "test.TinyLM", "None", 1)
    with pytest.raises(sax.errors.NotFoundError):
        sax.Unpublish("/sax/test/nope")
    with pytest.raises(sax.errors.InvalidArgumentError):
        sax.Publish("/sax/test/neg", "test.TinyLM", "None", -1)
    with pytest.raises(sax.errors.InvalidArgumentError):
        sax.Publish("/sax/test/ovr", "test.TinyLM", "None", 1, {"NO_SUCH_KEY": "1"})
    with pytest.raises(sax.errors.NotFoundError):
        sax.Publish("/sax/test/cfg", "no.SuchConfig", "None", 1)
    with pytest.raises(sax.errors.NotFoundError, match="/sax/other"):
        sax.Publish("/sax/other/m", "test.TinyLM", "None", 1)

    assert c.store.read(state_path) == state_before
    assert sax.ListDetail(MODEL) == list_before
    assert sax.ListAll(c.cell) == [MODEL]
    loc = cell_layout.read_location(c.store, parse_cell(c.cell))
    assert loc.location == c.admin.address
