"""The cell lease (admin_server/lease.py) on the local backend and on the GCS code path (over a
fake client that enforces generation preconditions), model-server fencing, and an admin that
loses its lease stepping down."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.api_core.exceptions import PreconditionFailed

from admin_server.config import AdminConfig
from admin_server.lease import Lease, LeaseRecord, Renewal
from admin_server.server import AdminServer
from model_server.config import ModelServerConfig
from model_server.loader import build_servable
from model_server.server import ModelServer
from sax import cell as cell_layout
from sax.naming import parse_cell
from sax.storage import Store
from sax.storage.gcs import GcsStore
from sax.storage.local import LocalStore
from sax.v1 import admin_pb2, admin_pb2_grpc, common_pb2, modelet_pb2, modelet_pb2_grpc
from tests.faults import fake_gcs

PATH = "sax/test/lease"
LEASE_S = 6.0
SKEW_S = 1.0


class Clock:
    """A settable clock shared by the wall and monotonic readings of several leases."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path, monkeypatch) -> Iterator[Store]:
    """A LocalStore, then a GcsStore whose client is the precondition-enforcing fake."""
    if request.param == "local":
        yield LocalStore(tmp_path)
    else:
        fake_gcs.install(monkeypatch, bucket="sax-test")
        yield GcsStore("gs://sax-test/root")


def _lease(store: Store, holder: str, clock: Clock, address: str = "") -> Lease:
    return Lease(
        store,
        PATH,
        holder,
        address or f"127.0.0.1:{abs(hash(holder)) % 50000 + 1000}",
        lease_s=LEASE_S,
        clock_skew_s=SKEW_S,
        wall=clock,
        mono=clock,
    )


def _race(leases: list[Lease]) -> list[Lease]:
    """Runs try_acquire on every lease at once (threads behind a barrier); returns the winners."""
    barrier = threading.Barrier(len(leases))
    won: list[Lease] = []
    lock = threading.Lock()

    def go(lease: Lease) -> None:
        barrier.wait()
        if lease.try_acquire():
            with lock:
                won.append(lease)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return won


def test_racing_acquirers_one_holder_at_a_time_fencing_increases(store: Store) -> None:
    clock = Clock()
    leases = [_lease(store, f"admin{i}", clock) for i in range(8)]
    fencings = []
    for _ in range(4):
        winners = _race(leases)
        assert len(winners) == 1, [w.holder for w in winners]
        holder = winners[0]
        assert [x.holder for x in leases if x.held()] == [holder.holder]
        record = LeaseRecord.from_bytes(store.read(PATH) or b"")
        assert (record.holder, record.fencing) == (holder.holder, holder.fencing)
        fencings.append(holder.fencing)
        # While it holds, nobody else gets it; then let it run out without renewal.
        assert _race([x for x in leases if x is not holder]) == []
        clock.t += LEASE_S + SKEW_S + 0.01
        assert not holder.held()
    assert fencings == sorted(set(fencings)) and fencings[0] == 1, fencings


def test_expiry_takeover_and_the_old_leader_loses_on_renew(store: Store) -> None:
    clock = Clock()
    a, b = _lease(store, "a", clock), _lease(store, "b", clock)
    assert a.try_acquire() and a.fencing == 1
    clock.t += LEASE_S / 3
    assert a.renew() is Renewal.RENEWED
    renewed_at = clock.t
    # The leader stops trusting its lease before any standby may take it.
    clock.t = renewed_at + LEASE_S - SKEW_S - 0.01
    assert a.held()
    clock.t = renewed_at + LEASE_S - SKEW_S
    assert not a.held()
    clock.t = renewed_at + LEASE_S + SKEW_S
    assert not b.try_acquire()  # not yet expired for a standby
    clock.t += 0.01
    assert b.try_acquire() and b.fencing == 2
    assert a.renew() is Renewal.LOST
    assert not a.held() and a.fencing == 0
    assert b.held() and b.renew() is Renewal.RENEWED
    assert LeaseRecord.from_bytes(store.read(PATH) or b"").holder == "b"


def test_release_hands_over_at_once_and_keeps_the_number(store: Store) -> None:
    clock = Clock()
    a, b = _lease(store, "a", clock), _lease(store, "b", clock)
    assert a.try_acquire()
    assert not b.try_acquire()
    assert a.release()
    record = LeaseRecord.from_bytes(store.read(PATH) or b"")
    assert (record.holder, record.fencing) == ("", 1)
    assert b.try_acquire() and b.fencing == 2  # no wait for expiry
    assert a.try_acquire() is False
    assert b.release() and a.try_acquire() and a.fencing == 3


class FlakyStore:
    """A store whose compare_and_swap fails (storage unreachable) while `down` is set."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.down = False

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def compare_and_swap(self, path: str, expected: bytes | None, data: bytes) -> bool:
        if self.down:
            raise OSError("storage unreachable")
        return self._inner.compare_and_swap(path, expected, data)


def test_unreachable_storage_makes_the_leader_step_down_in_time(store: Store) -> None:
    clock = Clock()
    flaky = FlakyStore(store)
    a = _lease(flaky, "a", clock)  # type: ignore[arg-type]
    assert a.try_acquire()
    flaky.down = True
    clock.t += 2.0
    assert a.renew() is Renewal.ERROR and a.held()  # still within the lease
    clock.t += LEASE_S - SKEW_S - 2.0
    assert a.renew() is Renewal.LOST and not a.held()
    flaky.down = False
    # Storage is back and nobody took over: the same admin may lead again, with a new number.
    assert a.try_acquire() and a.fencing == 2


def test_unreadable_record_is_replaced_with_a_higher_number(store: Store) -> None:
    clock = Clock()
    store.write(PATH, b"not json")
    a = _lease(store, "a", clock)
    assert a.try_acquire()
    assert a.fencing >= int(clock.t * 1000)
    assert json.loads(store.read(PATH) or b"")["holder"] == "a"


def test_a_holder_known_to_be_gone_is_replaced_before_expiry(store: Store) -> None:
    clock = Clock()
    old = _lease(store, "old", clock, address="127.0.0.1:7000")
    new = _lease(store, "new", clock, address="127.0.0.1:7000")
    assert old.try_acquire()
    assert not new.try_acquire(lambda r: False)
    assert new.try_acquire(lambda r: r.address == new.address)
    assert new.fencing == 2 and old.renew() is Renewal.LOST


def test_fake_gcs_enforces_generation_preconditions(monkeypatch) -> None:
    """The GCS code path of compare_and_swap really depends on the preconditions."""
    fake = fake_gcs.install(monkeypatch)
    s1, s2 = GcsStore("gs://sax-test/x"), GcsStore("gs://sax-test/x")
    assert s1.compare_and_swap("k", None, b"1")
    assert not s2.compare_and_swap("k", None, b"2")
    assert not s2.compare_and_swap("k", b"0", b"2")
    assert s2.compare_and_swap("k", b"1", b"2")
    assert s1.read("k") == b"2"
    # A writer holding a stale generation is refused with the real exception.
    bucket = fake.client().bucket("sax-test")
    blob = bucket.get_blob("x/k")
    assert blob is not None
    stale = blob.generation
    bucket.blob("x/k").upload_from_string(b"3")
    with pytest.raises(PreconditionFailed):
        bucket.blob("x/k").upload_from_string(b"4", if_generation_match=stale)
    with pytest.raises(PreconditionFailed):
        bucket.blob("x/k").upload_from_string(b"4", if_generation_match=0)
    assert s1.read("k") == b"3"


# ------------------------------------------------------------------------------- fencing


def test_model_server_refuses_a_lower_fencing_token() -> None:
    async def body() -> None:
        server = ModelServer(ModelServerConfig(host="127.0.0.1", port=0), builder=build_servable)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = modelet_pb2_grpc.ModeletStub(channel)

                def load(key: str, token: int) -> modelet_pb2.LoadRequest:
                    return modelet_pb2.LoadRequest(
                        model_key=key,
                        model_path="test.TinyLM",
                        checkpoint_path="None",
                        fencing_token=token,
                    )

                await stub.Load(load("/sax/test/a", 5), timeout=60)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Load(load("/sax/test/b", 4), timeout=60)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "fenced: token 4 < 5" in (err.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Unload(
                        modelet_pb2.UnloadRequest(model_key="/sax/test/a", fencing_token=3),
                        timeout=30,
                    )
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                await stub.Load(load("/sax/test/b", 5), timeout=60)  # equal: accepted
                await stub.Load(load("/sax/test/c", 0), timeout=60)  # 0: not fenced
                # A status poll from a newer admin raises the bar too.
                await stub.GetStatus(modelet_pb2.GetStatusRequest(fencing_token=9), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Unload(
                        modelet_pb2.UnloadRequest(model_key="/sax/test/a", fencing_token=8),
                        timeout=30,
                    )
                assert "fenced: token 8 < 9" in (err.value.details() or "")
                await stub.Unload(
                    modelet_pb2.UnloadRequest(model_key="/sax/test/a", fencing_token=10),
                    timeout=30,
                )
                status = await stub.GetStatus(modelet_pb2.GetStatusRequest(), timeout=5)
                assert sorted(m.model_key for m in status.models) == ["/sax/test/b", "/sax/test/c"]
                assert status.total_loads == 3 and status.total_unloads == 1
        finally:
            await server.stop(0)

    asyncio.run(body())


# ------------------------------------------------------------------------------- admin


def test_admin_that_loses_its_lease_steps_down_and_issues_nothing(tmp_path) -> None:
    """Another holder writes the lease (as after a takeover the old leader did not notice):
    the admin stops at its next renewal, answers UNAVAILABLE, loads nothing, and leads again
    with a higher fencing number once that lease runs out."""

    async def body() -> None:
        store = LocalStore(tmp_path)
        cell = parse_cell("/sax/test")
        cell_layout.create_cell(store, cell)
        admin = AdminServer(
            AdminConfig(
                sax_cell="/sax/test",
                sax_root=str(tmp_path),
                port=0,
                host="127.0.0.1",
                poll_period_s=0.2,
                adopt_grace_s=0.0,
                lease_s=1.5,
                lease_renew_s=0.2,
                standby_poll_s=0.1,
                clock_skew_s=0.2,
            )
        )
        await admin.start()
        ms = ModelServer(
            ModelServerConfig(
                host="127.0.0.1",
                port=0,
                sax_cell="/sax/test",
                sax_root=str(tmp_path),
                join_period_s=0.2,
            ),
            builder=build_servable,
        )
        await ms.start()
        channel = grpc.aio.insecure_channel(admin.config.address)
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            assert admin.is_leader and admin.fencing == 1
            await _until(lambda: admin.manager is not None and admin.manager.num_servers() == 1)
            # Someone else holds the lease now, with a higher number.
            other = LeaseRecord(
                holder="intruder",
                address="127.0.0.1:1",
                fencing=admin.fencing + 1,
                renewed_ms=int(time.time() * 1000),
                lease_s=1.5,
            )
            store.write(cell_layout.cell_dir(cell) + "/lease", other.to_bytes())
            await _until(lambda: not admin.is_leader, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.List(admin_pb2.ListRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "standby" in (err.value.details() or "")
            # A publish written behind its back is not acted upon while it is a standby.
            state = cell_layout.read_state(store, cell)
            state.models.add(
                model_id="/sax/test/m",
                model_path="test.TinyLM",
                checkpoint_path="None",
                requested_num_replicas=1,
                version=1,
                uuid=b"0123456789abcdef",
            )
            cell_layout.write_state(store, cell, state)
            await asyncio.sleep(0.5)
            assert ms.manager.total_loads == 0
            # The intruder never renews: the admin leads again and loads what is published.
            await _until(lambda: admin.is_leader, timeout=10)
            assert admin.fencing == other.fencing + 1 and admin.terms == 2
            await _until(
                lambda: any(m.status == common_pb2.LOADED for m in ms.manager.statuses()),
                timeout=30,
            )
        finally:
            await channel.close()
            await ms.stop(0)
            await admin.stop(0)

    asyncio.run(body())


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


class GatedStore(FlakyStore):
    """A store whose compare_and_swap waits for `go` while `gated` is set (a slow storage call
    that outlives the caller's wait)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.gated = False
        self.entered = threading.Event()
        self.go = threading.Event()

    def compare_and_swap(self, path: str, expected: bytes | None, data: bytes) -> bool:
        if self.gated:
            self.entered.set()
            self.go.wait(30)
        return super().compare_and_swap(path, expected, data)


def test_standby_stopped_while_taking_the_lease_gives_it_back(tmp_path) -> None:
    """stop() cancels a standby while its storage thread is writing the lease; the write then
    succeeds: stop() still releases the lease, so a third admin does not wait it out."""

    def config() -> AdminConfig:
        return AdminConfig(
            sax_cell="/sax/test",
            sax_root=str(tmp_path),
            port=0,
            host="127.0.0.1",
            adopt_grace_s=0.0,
            standby_poll_s=0.05,
        )

    async def body() -> None:
        store = LocalStore(tmp_path)
        cell = parse_cell("/sax/test")
        cell_layout.create_cell(store, cell)
        lease_path = cell_layout.cell_dir(cell) + "/lease"
        first = AdminServer(config())
        await first.start()
        second = AdminServer(config())
        gated = GatedStore(second._store)
        second._store = gated  # type: ignore[assignment]
        await second.start()
        stopping: asyncio.Task[None] | None = None
        try:
            assert first.is_leader and not second.is_leader
            gated.gated = True
            await first.stop(0)  # releases the lease: the standby's write now hangs
            assert await asyncio.to_thread(gated.entered.wait, 30)
            stopping = asyncio.create_task(second.stop(0))
            await _until(lambda: second._run_task is not None and second._run_task.done(), 30)
            gated.go.set()  # the write the standby no longer waits for goes through
            await asyncio.wait_for(stopping, 30)
            assert not second.is_leader
            record = LeaseRecord.from_bytes(store.read(lease_path) or b"")
            assert record.holder == "" and record.fencing == 2  # taken, then given back
        finally:
            gated.go.set()
            await asyncio.wait_for(first.stop(0), 30)
            await asyncio.wait_for(stopping or second.stop(0), 30)

    asyncio.run(body())
