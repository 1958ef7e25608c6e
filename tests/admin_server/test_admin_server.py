"""The admin server in-process with real model servers in-process, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from admin_server.config import AdminConfig
from admin_server.server import AdminServer
from model_server.config import ModelServerConfig
from model_server.loader import build_servable
from model_server.server import ModelServer
from sax import cell as cell_layout
from sax.naming import parse_cell
from sax.storage.local import LocalStore
from sax.v1 import admin_pb2, admin_pb2_grpc, common_pb2

CELL = "/sax/test"
MODEL = "/sax/test/tiny"


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Awaits predicate() until true; fails the test after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


class Cell:
    """An admin and model servers in this process."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.admin: AdminServer | None = None
        self.servers: list[ModelServer] = []
        self._channels: list[grpc.aio.Channel] = []

    async def start_admin(self, **overrides: float) -> AdminServer:
        settings = {"poll_period_s": 0.2, "dead_after_s": 1.5, "adopt_grace_s": 0.0, **overrides}
        config = AdminConfig(
            sax_cell=CELL, sax_root=self.root, port=0, host="127.0.0.1", **settings
        )
        self.admin = AdminServer(config)
        await self.admin.start()
        return self.admin

    async def start_server(self, builder=build_servable, **overrides) -> ModelServer:
        overrides = {"port": 0, **overrides}
        config = ModelServerConfig(
            host="127.0.0.1",
            sax_cell=CELL,
            sax_root=self.root,
            join_period_s=0.2,
            **overrides,
        )
        server = ModelServer(config, builder=builder)
        await server.start()
        self.servers.append(server)
        return server

    def stub(self) -> admin_pb2_grpc.AdminStub:
        assert self.admin is not None
        channel = grpc.aio.insecure_channel(self.admin.config.address)
        self._channels.append(channel)
        return admin_pb2_grpc.AdminStub(channel)

    async def listed(self, model_id: str = MODEL) -> admin_pb2.PublishedModel:
        resp = await self.stub().List(admin_pb2.ListRequest(model_id=model_id), timeout=5)
        return resp.published_models[0]

    async def ready(self, model_id: str = MODEL) -> set[str]:
        return set((await self.listed(model_id)).modelet_addresses)

    async def close(self) -> None:
        # Bounded: a stop that hangs fails the test with its name instead of a suite timeout.
        for channel in self._channels:
            await asyncio.wait_for(channel.close(), 10)
        for server in self.servers:
            await asyncio.wait_for(server.stop(0), 20)
        if self.admin is not None:
            await asyncio.wait_for(self.admin.stop(0), 20)


@contextlib.asynccontextmanager
async def cell(tmp_path) -> AsyncIterator[Cell]:
    cell_layout.create_cell(LocalStore(tmp_path), parse_cell(CELL))
    c = Cell(str(tmp_path))
    try:
        yield c
    finally:
        await c.close()


def publish(model_id: str = MODEL, replicas: int = 1, path: str = "test.TinyLM", **overrides):
    return admin_pb2.PublishRequest(
        model=admin_pb2.Model(
            model_id=model_id,
            model_path=path,
            checkpoint_path="None",
            requested_num_replicas=replicas,
            overrides=overrides,
        )
    )


def test_publish_places_on_two_servers_and_watch_sees_them(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin()
            a, b = await c.start_server(), await c.start_server()
            stub = c.stub()
            watch = stub.WatchLoc(admin_pb2.WatchLocRequest(model_id=MODEL))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await watch.read()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND

            await stub.Publish(publish(replicas=2), timeout=5)
            watch = stub.WatchLoc(admin_pb2.WatchLocRequest(model_id=MODEL))
            await stub.WaitForReady(
                admin_pb2.WaitForReadyRequest(model_id=MODEL, num_replicas=2), timeout=10
            )
            seen: set[str] = set()
            while len(seen) < 2:
                seen = set((await asyncio.wait_for(watch.read(), 5)).addresses)
            assert seen == {a.address, b.address}
            listed = await c.listed()
            assert [r.status for r in listed.replicas] == [common_pb2.LOADED] * 2
            assert "lm.generate" in listed.model.method_names
            assert not listed.model.uuid

            await stub.Unpublish(admin_pb2.UnpublishRequest(model_id=MODEL), timeout=5)
            last = await asyncio.wait_for(watch.read(), 5)
            assert list(last.addresses) == []
            await until(lambda: _no_models(a, b))
            watch.cancel()

    asyncio.run(body())


async def _no_models(*servers: ModelServer) -> bool:
    return all(not s.manager.statuses() for s in servers)


def test_failed_load_is_retried_on_another_server(tmp_path) -> None:
    def broken(config, checkpoint_path):
        raise RuntimeError("device on fire")

    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin()
            bad = await c.start_server(builder=broken)
            stub = c.stub()
            await stub.Publish(publish(replicas=1), timeout=5)
            await until(lambda: _has_failure(c, bad.address))
            good = await c.start_server()
            await until(lambda: _ready_is(c, {good.address}))
            assert bad.manager.statuses() == []  # the failed entry was unloaded
            listed = await c.listed()
            failed = [r for r in listed.replicas if r.status == common_pb2.FAILED]
            assert [r.address for r in failed] == [bad.address]

    asyncio.run(body())


async def _has_failure(c: Cell, address: str) -> bool:
    listed = await c.listed()
    return any(r.address == address and r.status == common_pb2.FAILED for r in listed.replicas)


async def _ready_is(c: Cell, addresses: set[str]) -> bool:
    return await c.ready() == addresses


def test_memory_and_platform_decide_where_replicas_go(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin()
            small = await c.start_server(memory_bytes=1000)  # too small for test.TinyLM
            tpu = await c.start_server(chip="tpuv5e", topology="4")  # mesh 1x1x1 does not fit
            big = await c.start_server()
            stub = c.stub()
            await stub.Publish(publish(replicas=3), timeout=5)
            await stub.Publish(publish("/sax/test/other", replicas=1), timeout=5)
            await until(lambda: _ready_is(c, {big.address}))
            await until(lambda: _ready_in(c, "/sax/test/other", {big.address}))
            assert small.manager.statuses() == [] and tpu.manager.statuses() == []
            stats = await stub.Stats(admin_pb2.StatsRequest(), timeout=5)
            used = {s.address: s.memory_used_bytes for s in stats.servers}
            assert used[small.address] == 0 and used[big.address] > 0

    asyncio.run(body())


async def _ready_in(c: Cell, model_id: str, addresses: set[str]) -> bool:
    return await c.ready(model_id) == addresses


def test_restarted_admin_adopts_without_reloading(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin()
            a, b = await c.start_server(), await c.start_server()
            await c.stub().Publish(publish(replicas=2), timeout=5)
            await until(lambda: _ready_is(c, {a.address, b.address}))
            loads = (a.manager.total_loads, b.manager.total_loads)
            assert c.admin is not None
            await c.admin.stop(0)
            await c.start_admin(adopt_grace_s=1.0)
            await until(lambda: _ready_is(c, {a.address, b.address}))
            await asyncio.sleep(1.5)  # past the grace period: still nothing reloaded
            assert (a.manager.total_loads, b.manager.total_loads) == loads
            assert await c.ready() == {a.address, b.address}

    asyncio.run(body())


def test_dead_server_replica_moves(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin()
            a, b = await c.start_server(), await c.start_server()
            await c.stub().Publish(publish(replicas=1), timeout=5)
            await until(lambda: _ready_count(c, 1))
            first = next(iter(await c.ready()))
            victim = a if a.address == first else b
            survivor = b if victim is a else a
            await victim.stop(0)
            c.servers.remove(victim)
            await until(lambda: _ready_is(c, {survivor.address}), timeout=10)

    asyncio.run(body())


async def _ready_count(c: Cell, n: int) -> bool:
    return len(await c.ready()) == n


def test_new_checkpoint_reloads_replicas_one_at_a_time(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin()
            a, b = await c.start_server(), await c.start_server()
            stub = c.stub()
            await stub.Publish(publish(replicas=2), timeout=5)
            await until(lambda: _ready_is(c, {a.address, b.address}))
            loads = a.manager.total_loads + b.manager.total_loads
            model = (await c.listed()).model
            model.checkpoint_path = "/ckpt/checkpoint_00000001"
            min_ready = 2
            await stub.Update(admin_pb2.UpdateRequest(model=model), timeout=5)

            async def reloaded() -> bool:
                nonlocal min_ready
                min_ready = min(min_ready, len(await c.ready()))
                return (
                    all(
                        s.manager.statuses()[0].checkpoint_path == model.checkpoint_path
                        for s in (a, b)
                        if s.manager.statuses()
                    )
                    and len(await c.ready()) == 2
                )

            await until(reloaded)
            assert a.manager.total_loads + b.manager.total_loads == loads + 2
            assert min_ready >= 1  # one replica kept serving throughout

    asyncio.run(body())


def _update(model: admin_pb2.Model, replicas: int) -> admin_pb2.UpdateRequest:
    new = admin_pb2.Model()
    new.CopyFrom(model)
    new.requested_num_replicas = replicas
    return admin_pb2.UpdateRequest(model=new)


def test_quick_replica_changes_and_republish_converge(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin()
            a, b = await c.start_server(), await c.start_server()
            stub = c.stub()
            await stub.Publish(publish(replicas=2), timeout=5)
            await until(lambda: _ready_count(c, 2))
            model = (await c.listed()).model
            await stub.Update(_update(model, 1), timeout=5)
            await asyncio.sleep(0.05)
            await stub.Update(_update(model, 2), timeout=5)
            await until(lambda: _ready_is(c, {a.address, b.address}))

            await stub.Unpublish(admin_pb2.UnpublishRequest(model_id=MODEL), timeout=5)
            await stub.Publish(publish(replicas=2), timeout=5)
            await until(lambda: _ready_is(c, {a.address, b.address}))

    asyncio.run(body())


def test_server_restarted_on_the_same_address_gets_its_replica_back(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin(dead_after_s=30.0)  # the restart is seen by id, not by timeout
            a = await c.start_server()
            await c.stub().Publish(publish(replicas=1), timeout=5)
            await until(lambda: _ready_is(c, {a.address}))
            await a.stop(0)
            c.servers.remove(a)
            again = await c.start_server(port=a.port)
            assert again.address == a.address
            await until(lambda: _loaded_on(again))
            await until(lambda: _ready_is(c, {a.address}))

    asyncio.run(body())


async def _loaded_on(server: ModelServer) -> bool:
    return any(m.status == common_pb2.LOADED for m in server.manager.statuses())


def test_second_admin_waits_as_standby_and_takes_over_when_the_first_stops(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            first = await c.start_admin()
            a = await c.start_server()
            await c.stub().Publish(publish(replicas=1), timeout=5)
            await until(lambda: _ready_is(c, {a.address}))
            second = await c.start_admin()  # the lease is held: it waits as a standby
            assert first.is_leader and not second.is_leader
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.stub().List(admin_pb2.ListRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert first.config.address in (err.value.details() or "")
            loads, first_fencing = a.manager.total_loads, first.fencing
            await first.stop(0)  # gives the lease up: the standby takes over at once

            async def leads() -> bool:
                return second.is_leader

            await until(leads, timeout=5)
            assert second.fencing > first_fencing
            await until(lambda: _ready_is(c, {a.address}))
            await c.stub().Publish(publish("/sax/test/two", replicas=1), timeout=5)
            await until(lambda: _ready_in(c, "/sax/test/two", {a.address}))
            assert a.manager.total_loads == loads + 1  # adopted, not reloaded

    asyncio.run(body())


def test_restarted_admin_never_sends_watchers_an_empty_set(tmp_path) -> None:
    async def body() -> None:
        async with cell(tmp_path) as c:
            await c.start_admin()
            a = await c.start_server()
            await c.stub().Publish(publish(replicas=1), timeout=5)
            await until(lambda: _ready_is(c, {a.address}))
            assert c.admin is not None
            await c.admin.stop(0)
            await c.start_admin(adopt_grace_s=5.0)
            watch = c.stub().WatchLoc(admin_pb2.WatchLocRequest(model_id=MODEL))
            first = await asyncio.wait_for(watch.read(), 5)
            assert list(first.addresses) == [a.address]
            watch.cancel()

    asyncio.run(body())
