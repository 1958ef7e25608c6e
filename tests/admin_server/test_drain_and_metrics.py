"""A draining model server leaves the cell at once (not at the next poll), and the admin's
Prometheus endpoint follows the cell: an admin and two model servers in-process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client.parser import text_string_to_metric_families

from admin_server.config import AdminConfig
from admin_server.metrics import AdminMetrics
from admin_server.server import AdminServer
from model_server.config import ModelServerConfig
from model_server.server import ModelServer
from sax import cell as cell_layout
from sax.naming import parse_cell
from sax.storage.local import LocalStore
from sax.v1 import admin_pb2, admin_pb2_grpc

CELL = "/sax/test"
MODEL = "/sax/test/tiny"


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if await result if isinstance(result, Awaitable) else result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_draining_server_leaves_at_once_and_metrics_follow(tmp_path) -> None:
    async def body() -> None:
        cell_layout.create_cell(LocalStore(tmp_path), parse_cell(CELL))
        # Polls and the dead-server timeout are slow: only the draining Join can explain a
        # fast drop.
        admin = AdminServer(
            AdminConfig(
                sax_cell=CELL,
                sax_root=str(tmp_path),
                port=0,
                host="127.0.0.1",
                poll_period_s=5.0,
                dead_after_s=60.0,
                adopt_grace_s=0.0,
            )
        )
        metrics = AdminMetrics(admin)
        port = metrics.serve("127.0.0.1", 0)
        await admin.start()
        servers = []
        for _ in range(2):
            config = ModelServerConfig(
                host="127.0.0.1", port=0, sax_cell=CELL, sax_root=str(tmp_path), join_period_s=0.2
            )
            servers.append(ModelServer(config))
            await servers[-1].start()
        channel = grpc.aio.insecure_channel(admin.config.address)
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            await until(lambda: all(s.joined_admin_id for s in servers))
            assert (await asyncio.to_thread(scrape, port))[("sax_admin_servers_joined", ())] == 2
            model = admin_pb2.Model(
                model_id=MODEL,
                model_path="test.TinyLM",
                checkpoint_path="None",
                requested_num_replicas=1,
            )
            await stub.Publish(admin_pb2.PublishRequest(model=model), timeout=10)
            watch = stub.WatchLoc(admin_pb2.WatchLocRequest(model_id=MODEL))
            first: list[str] = []
            while not first:
                first = list((await watch.read()).addresses)
            (address,) = first
            before = await asyncio.to_thread(scrape, port)
            assert before[("sax_admin_models", ())] == 1
            assert before[("sax_admin_replicas_wanted", (("model", MODEL),))] == 1
            assert before[("sax_admin_replicas_ready", (("model", MODEL),))] == 1
            assert before[("sax_admin_placement_changes_total", ())] >= 1
            assert before[("sax_admin_state_save_failures_total", ())] == 0
            assert before[("sax_admin_is_leader", ())] == 1

            hosting = next(s for s in servers if s.address == address)
            other = next(s for s in servers if s is not hosting)
            started = time.monotonic()
            stopping = asyncio.create_task(hosting.stop(grace=5))
            update = list((await watch.read()).addresses)
            dropped_after = time.monotonic() - started
            assert address not in update
            # Well under the 5 s poll period (slack for a busy machine).
            assert dropped_after < 2.5, f"the admin dropped the server after {dropped_after:.2f} s"
            # The replica is placed on the other server, long before any poll could notice.
            while update != [other.address]:
                update = list((await watch.read()).addresses)
            assert time.monotonic() - started < 5.0
            await stopping
            after = await asyncio.to_thread(scrape, port)
            assert after[("sax_admin_servers_joined", ())] == 1
            assert after[("sax_admin_replicas_ready", (("model", MODEL),))] == 1
            assert (
                after[("sax_admin_placement_changes_total", ())]
                > before[("sax_admin_placement_changes_total", ())]
            )
            watch.cancel()
        finally:
            await channel.close()
            for server in servers:
                await server.stop(0)
            await admin.stop(0)
            metrics.close()

    asyncio.run(body())
