"""ModelServer: health service, binding, and the join loop against fake admins on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import threading
import time
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
from sax.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    lm_pb2,
    lm_pb2_grpc,
    modelet_pb2,
    modelet_pb2_grpc,
)
from tests.model_server.conftest import wait_for

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


# ---------------------------------------------------------------------------------- drain

GATED_KEY = "/sax/test/gated"
GATED_OVERRIDES = {"INPUT_SEQ_LEN": "32", "MAX_DECODE_STEPS": "24", "BUCKET_KEYS": "[32]"}


class GatedEngines:
    """Builds EngineServables over fake runners with `slots` KV cache slots whose decodes wait
    for `gate` (the test steps the engine)."""

    def __init__(self, tmp: pathlib.Path, slots: int = 1) -> None:
        from model_server.engine.tokenizer import Tokenizer
        from tests.model_server.engine.fakes import write_tokenizer

        self.tokenizer = Tokenizer.from_dir(write_tokenizer(tmp / "tok"))
        self.gate = threading.Semaphore(0)
        self.slots = slots
        self.servables: list[Any] = []

    def build(self, config: Any, checkpoint: str) -> Any:
        from model_server.engine.engine_servable import EngineServable
        from tests.model_server.engine.fakes import FakeRunner

        runner = FakeRunner(num_slots=self.slots, max_seq_len=56, gate=self.gate)
        self.servables.append(EngineServable(config, runner, self.tokenizer))
        return self.servables[-1]

    def load(self, address: str) -> None:
        with grpc.insecure_channel(address) as ch:
            modelet_pb2_grpc.ModeletStub(ch).Load(
                modelet_pb2.LoadRequest(
                    model_key=GATED_KEY,
                    model_path="llama.SmolLM2_135M",
                    checkpoint_path="gated",
                    overrides=GATED_OVERRIDES,
                ),
                timeout=30,
            )


def _generate(text: str, **items: float) -> lm_pb2.GenerateRequest:
    extra = common_pb2.ExtraInputs(items=items)
    return lm_pb2.GenerateRequest(model_key=GATED_KEY, text=text, extra_inputs=extra)


def _status(address: str) -> modelet_pb2.GetStatusResponse:
    with grpc.insecure_channel(address) as ch:
        stub = modelet_pb2_grpc.ModeletStub(ch)
        return stub.GetStatus(modelet_pb2.GetStatusRequest(), timeout=5)


def test_stop_drains_in_flight_calls_and_refuses_new_ones(
    store: LocalStore,
    start_server: Callable[..., ModelServer],
    admins: Callable[[str], FakeAdmin],
    loop_thread: Any,
    tmp_path: pathlib.Path,
) -> None:
    engines = GatedEngines(tmp_path, slots=2)
    admin = admins("admin-d")
    sax_cell.write_location(store, CELL, admin.address, "admin-d")
    server = start_server(
        sax_cell="/sax/test", store=store, join_period_s=0.05, builder=engines.build
    )
    wait_for(lambda: server.joined_admin_id == "admin-d", what="the join")
    engines.load(server.address)
    with grpc.insecure_channel(server.address) as ch:
        lm = lm_pb2_grpc.LMServiceStub(ch)
        stream = lm.GenerateStream(_generate("abc", per_example_max_decode_steps=5), timeout=60)
        assert next(stream).items  # in flight, waiting at the gate
        unary = lm.Generate.future(_generate("xyz", per_example_max_decode_steps=5), timeout=60)
        wait_for(lambda: server.calls.in_flight == 2, what="two calls in flight")

        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=30), loop_thread.loop)
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == NOT_SERVING
        # The admin was told at once, with a last Join that says so.
        wait_for(lambda: admin.joins and admin.joins[-1].draining, what="a draining Join")
        assert admin.joins[-1].server_id == server.server_id
        assert _status(server.address).health_reason.startswith("draining")
        # New calls are refused with UNAVAILABLE, which clients retry on another replica.
        with pytest.raises(grpc.RpcError) as e:
            lm.Generate(_generate("new"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
        assert not stopping.done()

        engines.gate.release(1000)  # the calls in flight finish
        assert len(list(stream)) >= 1
        assert unary.result(timeout=30).texts[0].text
    stopping.result(30)
    assert server.calls.in_flight == 0
    joins = len(admin.joins)
    time.sleep(0.3)
    assert len(admin.joins) == joins, "a draining server joins no more"


def test_stop_cancels_what_is_still_running_after_the_grace_period(
    start_server: Callable[..., ModelServer], loop_thread: Any, tmp_path: pathlib.Path
) -> None:
    engines = GatedEngines(tmp_path)
    server = start_server(builder=engines.build)
    engines.load(server.address)
    with grpc.insecure_channel(server.address) as ch:
        stream = lm_pb2_grpc.LMServiceStub(ch).GenerateStream(_generate("abc"), timeout=60)
        assert next(stream).items
        started = time.monotonic()
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=0.5), loop_thread.loop)
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert time.monotonic() - started < 10
    engines.gate.release(1000)  # the engine's step in flight ends; the unload can go on
    stopping.result(30)
    assert server.calls.in_flight == 0


# ------------------------------------------------------------------- deadlines and cancels


@pytest.fixture(scope="module")
def gated(
    start_server: Callable[..., ModelServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatedEngines, str]]:
    engines = GatedEngines(tmp_path_factory.mktemp("gated"))
    server = start_server(builder=engines.build)
    engines.load(server.address)
    yield engines, server.address
    engines.gate.release(1000)


def _slot_back(engines: GatedEngines) -> None:
    """Steps the engine one decode at a time until its only slot is free again; the request
    wanted 24 steps, so a slot back within 12 means the request was aborted."""
    servable = engines.servables[-1]
    for _ in range(12):
        engines.gate.release(1)
        try:
            wait_for(lambda: servable.stats().free_slots == 1, timeout=2, what="the slot back")
            return
        except AssertionError:
            continue
    raise AssertionError("the request kept its slot for 12 decode steps")


def test_a_cancelled_unary_generate_frees_its_slot(gated: tuple[GatedEngines, str]) -> None:
    engines, address = gated
    servable = engines.servables[-1]
    with grpc.insecure_channel(address) as ch:
        future = lm_pb2_grpc.LMServiceStub(ch).Generate.future(_generate("abc"), timeout=60)
        wait_for(lambda: servable.stats().running == 1, what="the request running")
        assert future.cancel()
        _slot_back(engines)
        assert servable.stats().running == 0 and servable.stats().waiting == 0


def test_the_callers_deadline_ends_a_running_request(gated: tuple[GatedEngines, str]) -> None:
    engines, address = gated
    servable = engines.servables[-1]
    with grpc.insecure_channel(address) as ch:
        future = lm_pb2_grpc.LMServiceStub(ch).Generate.future(_generate("abc"), timeout=1.0)
        wait_for(lambda: servable.stats().running == 1, what="the request running")
        with pytest.raises(grpc.RpcError) as e:
            future.result(timeout=30)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _slot_back(engines)
