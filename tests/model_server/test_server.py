"""ModelServer: health service, binding, and the join loop against fake admins on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model_server.server import ModelServer, servable_model_paths
from sax import cell as sax_cell
from sax.errors import UnavailableError
from sax.naming import CellName
from sax.storage.local import LocalStore
from sax.v1 import admin_pb2, admin_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CELL = CellName("test")


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """Records Join calls and answers with its admin id."""

    def __init__(self, admin_id: str) -> None:
        self.admin_id = admin_id
        self.joins: list[admin_pb2.JoinRequest] = []
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> FakeAdmin:
        self.server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(0)

    async def Join(
        self, request: admin_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.JoinResponse:
        self.joins.append(request)
        return admin_pb2.JoinResponse(admin_id=self.admin_id)


@pytest.fixture
def store(tmp_path: pathlib.Path) -> LocalStore:
    s = LocalStore(tmp_path)
    sax_cell.create_cell(s, CELL)
    return s


@pytest.fixture
def admins(loop_thread: Any) -> Iterator[Callable[[str], FakeAdmin]]:
    started: list[FakeAdmin] = []

    def start(admin_id: str) -> FakeAdmin:
        admin = loop_thread.run(FakeAdmin(admin_id).start())
        started.append(admin)
        return admin

    yield start
    for admin in started:
        loop_thread.run(admin.stop())


def health_check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(ch).Check(request, timeout=5).status


def test_health_is_serving(server: ModelServer) -> None:
    assert health_check(server.address) == SERVING
    assert health_check(server.address, "sax.v1.LMService") == SERVING
    assert health_check(server.address, "sax.v1.Modelet") == SERVING


def test_stop_turns_health_not_serving(
    loop_thread: Any, start_server: Callable[..., ModelServer]
) -> None:
    server = start_server()
    with grpc.insecure_channel(server.address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == SERVING
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=0.2), loop_thread.loop)
        assert next(watch).status == NOT_SERVING
        stopping.result(10)


def test_port_in_use_is_unavailable(server: ModelServer, loop_thread: Any) -> None:
    from model_server.config import ModelServerConfig

    other = ModelServer(ModelServerConfig(host="127.0.0.1", port=server.port))
    with pytest.raises(UnavailableError, match="in use"):
        loop_thread.run(other.start())


def test_servable_model_paths_follow_the_platform() -> None:
    cpu = servable_model_paths("cpu", "1")
    assert "test.TinyLM" in cpu and "llama.SmolLM2_135M" in cpu
    assert "llama.LLaMA7BFP16TPUv5e" not in cpu
    assert "llama.LLaMA7BFP16TPUv5e" in servable_model_paths("tpuv5e", "4")
    assert "llama.SmolLM2_135M" not in servable_model_paths("tpuv5e", "4")
    assert servable_model_paths("cpu", "4") == []


def test_join_loop_joins_and_follows_the_location_record(
    store: LocalStore,
    start_server: Callable[..., ModelServer],
    admins: Callable[[str], FakeAdmin],
    loop_thread: Any,
    poll: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="model_server.server")
    server = start_server(
        sax_cell="/sax/test", store=store, join_period_s=0.02, tags=("zone-a",), memory_bytes=1234
    )
    # No admin has run yet: the server keeps serving and retries.
    poll(lambda: "cannot join" in caplog.text, what="the first join failure")
    assert health_check(server.address) == SERVING

    first = admins("admin-1")
    sax_cell.write_location(store, CELL, first.address, "admin-1")
    poll(lambda: server.joined_admin_id == "admin-1", what="a join to the first admin")
    join = first.joins[0]
    assert join.address == server.address
    assert join.server_id == server.server_id
    assert join.model_server == admin_pb2.ModelServer(
        chip_type="cpu",
        chip_topology="1",
        servable_model_paths=servable_model_paths("cpu", "1"),
        tags=["zone-a"],
        memory_bytes=1234,
    )
    poll(lambda: len(first.joins) >= 3, what="periodic joins")

    # The admin goes down: one warning for the whole outage.
    caplog.clear()
    loop_thread.run(first.stop())
    poll(lambda: "cannot join" in caplog.text, what="a join failure")
    count = len(first.joins)
    loop_thread.run(asyncio.sleep(0.2))
    assert caplog.text.count("cannot join") == 1

    # A new admin writes the location record: the server joins it.
    second = admins("admin-2")
    sax_cell.write_location(store, CELL, second.address, "admin-2")
    poll(lambda: server.joined_admin_id == "admin-2", what="a join to the second admin")
    assert second.joins[0].server_id == server.server_id
    assert len(first.joins) == count
    assert f"joined admin {second.address}" in caplog.text
    assert caplog.text.count("joined admin") == 1


def test_without_a_cell_there_is_no_join_loop(server: ModelServer) -> None:
    assert server.joined_admin_id == ""
    assert server.config.sax_cell == ""
