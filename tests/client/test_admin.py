"""Admin functions of the sax client against a fake Admin server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import grpc
import pytest

import sax
from sax import admin_conn
from sax.naming import CellName
from sax.v1 import admin_pb2

if TYPE_CHECKING:
    from conftest import AdminHandle, Cluster

M = "/sax/test/tiny"


def test_publish_list_update_unpublish(admin: AdminHandle) -> None:
    sax.Publish(M, "test.TinyLM", "None", 1, {"BATCH_SIZE": "4", "NAME": '"x"'})
    sax.Publish("/sax/test/other", "test.TinyLM", "None", 0)
    admin.fake.set_addresses(M, ["10.0.0.1:1", "10.0.0.2:1"])
    admin.fake.replicas[M] = [
        admin_pb2.ReplicaStatus(address="10.0.0.1:1", status=2),
        admin_pb2.ReplicaStatus(address="10.0.0.3:1", status=3, failure_reason="out of memory"),
    ]

    assert sax.List(M) == ("test.TinyLM", "None", 2)
    detail = sax.ListDetail(M)
    assert (detail.model, detail.ckpt, detail.max_replicas, detail.active_replicas) == (
        "test.TinyLM",
        "None",
        1,
        2,
    )
    assert detail.overrides == {"BATCH_SIZE": "4", "NAME": '"x"'}
    assert [(r.address, r.status, r.failure_reason) for r in detail.replicas] == [
        ("10.0.0.1:1", "LOADED", ""),
        ("10.0.0.3:1", "FAILED", "out of memory"),
    ]
    assert sax.ListAll("/sax/test") == ["/sax/test/other", M]

    admin.fake.models[M].acls.items["lm.generate"] = "acl/readers"
    sax.Update(M, "test.TinyLM", "/ckpt/v2", 3)
    stored = admin.fake.models[M]
    assert (stored.checkpoint_path, stored.requested_num_replicas) == ("/ckpt/v2", 3)
    assert dict(stored.overrides) == {"BATCH_SIZE": "4", "NAME": '"x"'}
    assert dict(stored.acls.items) == {"lm.generate": "acl/readers"}

    sax.Unpublish(M)
    with pytest.raises(sax.errors.NotFoundError):
        sax.List(M)
    assert sax.ListAll("/sax/test") == ["/sax/test/other"]


def test_errors_surface_as_sax_error_classes(admin: AdminHandle) -> None:
    sax.Publish(M, "test.TinyLM", "None", 1)
    with pytest.raises(sax.errors.AlreadyExistsError, match="is published"):
        sax.Publish(M, "test.TinyLM", "None", 1)
    with pytest.raises(sax.errors.NotFoundError):
        sax.Unpublish("/sax/test/missing")
    with pytest.raises(sax.errors.NotFoundError, match="unknown config"):
        sax.Publish("/sax/test/b", "no.SuchConfig", "None", 1)
    with pytest.raises(sax.errors.InvalidArgumentError, match="replicas"):
        sax.Publish("/sax/test/c", "test.TinyLM", "None", -1)
    with pytest.raises(sax.errors.InvalidArgumentError, match="model_path cannot change"):
        sax.Update(M, "llama.SmolLM2_135M", "None", 1)
    calls = len(admin.fake.calls)
    with pytest.raises(sax.errors.InvalidArgumentError, match="invalid model"):
        sax.Publish("/sax/test/Bad", "test.TinyLM", "None", 1)
    with pytest.raises(sax.errors.InvalidArgumentError, match="strings"):
        sax.Publish(M, "test.TinyLM", "None", 1, {"BATCH_SIZE": 4})  # type: ignore[dict-item]
    assert len(admin.fake.calls) == calls  # refused before any RPC


def test_missing_cell_admin_or_sax_root(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    with pytest.raises(sax.errors.UnavailableError, match="no admin server"):
        sax.ListAll("/sax/test", timeout=0.5)  # retried (the admin may be starting) until then
    assert 0.4 < time.monotonic() - started < 5
    with pytest.raises(sax.errors.NotFoundError, match="saxutil create /sax/nocell"):
        sax.ListAll("/sax/nocell")
    monkeypatch.delenv("SAX_ROOT", raising=False)
    sax.SetSaxRoot(None)
    with pytest.raises(sax.errors.FailedPreconditionError, match="SAX_ROOT"):
        sax.ListAll("/sax/test")


def test_stats_and_wait_for_ready(admin: AdminHandle) -> None:
    assert sax.Stats("/sax/test") == [sax.ModelServerTypeStat("cpu", "1", 2)]
    assert sax.StatsDetail(M).admin_id == "admin-1"
    sax.Publish(M, "test.TinyLM", "None", 1)
    timer = threading.Timer(0.1, admin.fake.set_addresses, (M, ["10.0.0.1:1"]))
    timer.start()
    sax.WaitForReady(M, 1, timeout=5)
    timer.join()
    start = time.monotonic()
    with pytest.raises(sax.errors.DeadlineExceededError, match="longer timeout"):
        sax.WaitForReady(M, 2, timeout=0.3)
    assert time.monotonic() - start < 2.0


def test_retries_resource_exhausted(admin: AdminHandle) -> None:
    admin.fake.add_model(M)
    admin.fake.failures["List"] = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert sax.List(M) == ("test.TinyLM", "None", 0)
    assert admin.fake.calls.count("List") == 3


def test_admin_re_resolved_when_it_moves(cluster: Cluster) -> None:
    first = cluster.start_admin("admin-1")
    first.fake.add_model(M)
    assert sax.List(M)[0] == "test.TinyLM"
    first.stop()

    second = cluster.new_admin("admin-2")
    second.models = dict(first.fake.models)

    def move() -> None:
        time.sleep(0.2)
        cluster.start_admin("admin-2", second)

    mover = threading.Thread(target=move)
    mover.start()
    try:
        # The first admin is down: the call retries, re-reading the location record until it
        # names the second admin.
        assert sax.List(M, timeout=10)[0] == "test.TinyLM"
    finally:
        mover.join()
    assert second.calls == ["List"]


def test_admin_down_fails_within_timeout(admin: AdminHandle) -> None:
    admin.fake.add_model(M)
    sax.List(M)
    admin.stop()
    start = time.monotonic()
    with pytest.raises((sax.errors.UnavailableError, sax.errors.DeadlineExceededError)) as info:
        sax.List(M, timeout=0.5)
    assert time.monotonic() - start < 1.5
    assert "python -m admin_server" in str(info.value)


def test_connection_cached_per_cell(admin: AdminHandle) -> None:
    conn = admin_conn.get(CellName("test"))
    assert admin_conn.get(CellName("test")) is conn
    assert conn.resolve()[1] == admin.address
