"""The admin's storage faults: a corrupt state file (the admin refuses to start, names the file
and the kept copy, and overwrites nothing), and sax_root unreachable while it serves (it keeps
serving from memory, refuses changes it cannot save, and loses nothing when storage returns)."""

from __future__ import annotations

import asyncio
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import sax
from admin_server.state import BACKUP_FILE, PublishedState
from sax import cell as cell_layout
from sax.errors import FailedPreconditionError
from sax.naming import parse_cell
from sax.storage.local import LocalStore
from sax.v1 import admin_pb2
from tests.faults.report import record
from tests.integration.cluster import REPO, Cluster, wait_for

CELL = parse_cell("/sax/test")
MODEL = "/sax/test/tiny"
OTHER = "/sax/test/other"


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    c = Cluster(root=str(tmp_path / "sax-root"), workdir=tmp_path)
    r = c.saxutil("create", c.cell)
    assert r.returncode == 0, r.stderr
    yield c
    c.close()


def _model(model_id: str, replicas: int = 1) -> admin_pb2.Model:
    return admin_pb2.Model(
        model_id=model_id,
        model_path="test.TinyLM",
        checkpoint_path="None",
        requested_num_replicas=replicas,
    )


def _saved_ids(data: bytes | None) -> list[str]:
    state = admin_pb2.State()
    state.ParseFromString(data or b"")
    return [m.model_id for m in state.models]


# ---------------------------------------------------------------------------- backup (in process)


def test_each_save_keeps_the_previous_good_state(tmp_path) -> None:
    store = LocalStore(tmp_path)
    cell_layout.create_cell(store, CELL)
    state = PublishedState(store, CELL)
    state.restore()
    asyncio.run(state.publish(_model(MODEL)))
    assert store.read(state.backup_path) is None  # nothing good existed before
    asyncio.run(state.publish(_model(OTHER)))
    assert _saved_ids(store.read(state.state_path)) == [OTHER, MODEL]
    assert _saved_ids(store.read(state.backup_path)) == [MODEL]
    asyncio.run(state.unpublish(MODEL))
    assert _saved_ids(store.read(state.state_path)) == [OTHER]
    assert _saved_ids(store.read(state.backup_path)) == [OTHER, MODEL]


_GARBAGE = [
    b"\xff\xff\xff\xff",  # does not parse
    b"he",  # parses, as an unknown field
    b"\x0a\x03abc",  # a model entry that is not a valid model
    admin_pb2.State(models=[_model("/sax/other/m")]).SerializeToString(),  # another cell's
    random.Random(5).randbytes(300),
]


@pytest.mark.parametrize("garbage", _GARBAGE, ids=range(len(_GARBAGE)))
def test_corrupt_state_is_refused_and_nothing_is_written(tmp_path, garbage: bytes) -> None:
    store = LocalStore(tmp_path)
    cell_layout.create_cell(store, CELL)
    first = PublishedState(store, CELL)
    first.restore()
    asyncio.run(first.publish(_model(MODEL)))
    asyncio.run(first.publish(_model(OTHER)))
    good = store.read(first.backup_path)
    store.write(first.state_path, garbage)

    again = PublishedState(store, CELL)
    with pytest.raises(FailedPreconditionError) as e:
        again.restore()
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert f"{tmp_path}/sax/test/state.proto is corrupt" in message
    assert f"cp {tmp_path}/sax/test/{BACKUP_FILE} {tmp_path}/sax/test/state.proto" in message
    assert store.read(first.state_path) == garbage
    assert store.read(first.backup_path) == good


def test_missing_state_with_a_kept_copy_is_refused(tmp_path) -> None:
    store = LocalStore(tmp_path)
    cell_layout.create_cell(store, CELL)
    state = PublishedState(store, CELL)
    state.restore()
    asyncio.run(state.publish(_model(MODEL)))
    asyncio.run(state.publish(_model(OTHER)))
    store.delete(state.state_path)
    with pytest.raises(FailedPreconditionError, match=r"state\.proto is missing"):
        PublishedState(store, CELL).restore()


# ---------------------------------------------------------------------------- processes


def _run_admin(c: Cluster, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs an admin process that is expected to exit by itself."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "admin_server",
            f"--sax_cell={c.cell}",
            "--port=0",
            "--host=127.0.0.1",
        ],
        cwd=REPO,
        env=c.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_corrupt_state_file_stops_the_admin(cluster: Cluster, monkeypatch) -> None:
    c = cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    admin = c.start_admin()
    for model_id in (MODEL, OTHER):
        r = c.saxutil("publish", model_id, "test.TinyLM", "None", "0")
        assert r.returncode == 0, r.stderr
    admin.kill()
    state_file = Path(c.root) / "sax" / "test" / "state.proto"
    backup = state_file.with_name(BACKUP_FILE)
    kept = backup.read_bytes()
    garbage = b"this is not a cell state\n"
    state_file.write_bytes(garbage)

    started = time.monotonic()
    r = _run_admin(c)
    refused_s = time.monotonic() - started
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("admin_server: "), r.stderr
    assert f"{state_file} is corrupt" in last, last
    assert "Traceback" not in r.stderr, r.stderr
    assert state_file.read_bytes() == garbage and backup.read_bytes() == kept

    # Following the message brings the admin back with the last good state.
    hint = last.split("run: ", 1)[1]
    assert shlex.split(hint)[0] == "cp", hint
    subprocess.run(shlex.split(hint), check=True)
    restarted = time.monotonic()
    c.start_admin(f"--port={admin.address.rsplit(':', 1)[1]}")  # its own address: no lease wait
    recovered_s = time.monotonic() - restarted
    assert sax.ListAll(c.cell) == [MODEL]  # the kept copy is one change behind
    record(
        "corrupt state file",
        "the admin refuses to start with one line naming state.proto and the command that "
        "restores the kept copy (state.proto.prev, one change behind); neither file is "
        "overwritten; after the copy the admin starts with the kept models",
        {
            "refused after": f"{refused_s:.1f} s (process start included)",
            "back after restoring the copy": f"{recovered_s:.1f} s",
            "models lost": "the last change (kept copy is one save behind)",
        },
        test="tests/faults/test_admin_storage_faults.py::test_corrupt_state_file_stops_the_admin",
    )


class _Outage:
    """Makes a local sax_root's cell folder unreachable: moved away, a file in its place (every
    read finds nothing, every write fails), until `end()` puts it back."""

    def __init__(self, root: str) -> None:
        self.cell_dir = Path(root) / "sax" / "test"
        self._away = self.cell_dir.with_name("test.away")

    def start(self) -> None:
        os.rename(self.cell_dir, self._away)
        self.cell_dir.write_bytes(b"")

    def end(self) -> None:
        self.cell_dir.unlink()
        os.rename(self._away, self.cell_dir)


@pytest.mark.slow
def test_storage_outage_keeps_serving_and_loses_nothing(cluster: Cluster, monkeypatch) -> None:
    c = cluster
    monkeypatch.setenv("SAX_ROOT", c.root)
    # The leader can renew its lease only through storage: an outage longer than the lease makes
    # it step down (see docs/reliability.md); this outage (about 8 s) stays within it.
    admin = c.start_admin("--poll_period_s=0.5", "--dead_after_s=3", "--lease_s=30")
    c.start_model_server()
    r = c.saxutil("publish", MODEL, "test.TinyLM", "None", "1")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: c.ready_addresses(MODEL), 30, "a replica")
    stub = c.admin_stub()
    lm = sax.Model(MODEL).LM()
    options = sax.ModelOptions()
    options.SetTimeout(20)
    assert lm.Generate("before", options)
    outage = _Outage(c.root)
    ok = failed = 0

    outage.start()
    try:
        started = time.monotonic()
        # Reads are answered from memory, generation goes on.
        while time.monotonic() - started < 4:  # longer than dead_after
            listed = stub.List(admin_pb2.ListRequest(), timeout=5)
            assert [p.model.model_id for p in listed.published_models] == [MODEL]
            try:
                assert lm.Generate("during", options)
                ok += 1
            except sax.errors.SaxError:
                failed += 1
        # A change that cannot be saved is refused after bounded retries; nothing changes.
        publish_at = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Publish(admin_pb2.PublishRequest(model=_model(OTHER)), timeout=30)
        refused_s = time.monotonic() - publish_at
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert "nothing was changed" in e.value.details()
        listed = stub.List(admin_pb2.ListRequest(), timeout=5)
        assert [p.model.model_id for p in listed.published_models] == [MODEL]
        listed = stub.List(admin_pb2.ListRequest(model_id=MODEL), timeout=5)
        assert listed.published_models[0].modelet_addresses  # the server was not dropped
        assert lm.Generate("still", options)
    finally:
        outage.end()

    back = time.monotonic()

    def publish() -> bool:
        stub.Publish(admin_pb2.PublishRequest(model=_model(OTHER, 0)), timeout=30)
        return True

    wait_for(publish, 30, "a publish after storage came back")
    recovered_s = time.monotonic() - back
    saved = Path(c.root) / "sax" / "test" / "state.proto"
    assert _saved_ids(saved.read_bytes()) == [OTHER, MODEL]

    # Nothing acknowledged is lost: a new admin (on the same address, so it takes the lease at
    # once) restores both models.
    admin.kill()
    c.start_admin(f"--port={admin.address.rsplit(':', 1)[1]}")
    assert sorted(sax.ListAll(c.cell)) == sorted([MODEL, OTHER])
    assert failed == 0 and ok > 0
    record(
        "storage (sax_root) unreachable",
        "the admin keeps answering List and WatchLoc from memory and clients keep generating; "
        "a change it cannot save is retried for 3 s, then refused with UNAVAILABLE and not "
        "applied; once storage is back changes are saved, and a restarted admin restores them",
        {
            "Generate calls failed during the outage": f"0 of {ok}",
            "Publish refused after": f"{refused_s:.1f} s (UNAVAILABLE)",
            "first save after storage returned": f"{recovered_s:.2f} s",
            "changes lost": "0",
        },
        test="tests/faults/test_admin_storage_faults.py::"
        "test_storage_outage_keeps_serving_and_loses_nothing",
    )
