"""`ModelServer`: the grpc.aio server (Modelet, LMService, health) and the join loop.

Every `join_period_s` the server reads its cell's location record and calls Admin.Join with its
address, server id and platform. Join is idempotent on the admin side, so sending it every period
is how the server finds a restarted or new admin; errors (no admin yet, admin down) are logged
once per outage and retried.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from model_server.config import ModelServerConfig, host_port
from model_server.model_manager import Builder, ModelManager
from model_server.models import build_servable
from model_server.params import platform, registry
from model_server.services.lm import LMServicer
from model_server.services.modelet import ModeletServicer
from sax import cell as sax_cell
from sax.errors import FailedPreconditionError, SaxError, UnavailableError
from sax.naming import CellName, parse_cell
from sax.storage import Store, open_store, resolve_sax_root
from sax.v1 import admin_pb2, admin_pb2_grpc, lm_pb2, lm_pb2_grpc, modelet_pb2, modelet_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    modelet_pb2.DESCRIPTOR.services_by_name["Modelet"].full_name,
    lm_pb2.DESCRIPTOR.services_by_name["LMService"].full_name,
)


def servable_model_paths(chip: str, topology: str) -> list[str]:
    """Registered config names this platform can host, sorted."""
    return [n for n in registry.names() if registry.get(n).can_serve_on(chip, topology)]


def _brief(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, SaxError):
        return str(e)
    return repr(e)


class ModelServer:
    """One model server process: start(), then stop() (or wait_for_termination())."""

    def __init__(
        self,
        config: ModelServerConfig,
        *,
        store: Store | None = None,
        builder: Builder = build_servable,
    ) -> None:
        """`store` overrides the sax_root of the config; `builder` makes servables from configs."""
        self.config = config
        self._chip = platform.parse_chip(config.chip)
        platform.num_devices(config.topology)  # raises INVALID_ARGUMENT when malformed
        self._cell: CellName | None = parse_cell(config.sax_cell) if config.sax_cell else None
        self._store = store
        self.server_id = secrets.token_hex(8)
        self._executor = ThreadPoolExecutor(config.compute_threads, thread_name_prefix="lm")
        self.manager = ModelManager(self._chip, config.topology, builder=builder)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._port = 0
        self._join_task: asyncio.Task[None] | None = None
        self._admin_channel: grpc.aio.Channel | None = None
        self._admin_address = ""
        self._stopping = False
        # Id of the admin this server last joined ("" before the first join).
        self.joined_admin_id = ""

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        return self._port

    @property
    def address(self) -> str:
        """ "host:port" the admin and clients reach this server at (after start)."""
        return host_port(self.config.advertised_host(), self._port)

    def model_server_info(self) -> admin_pb2.ModelServer:
        """What this server offers when joining."""
        return admin_pb2.ModelServer(
            chip_type=self._chip,
            chip_topology=self.config.topology,
            servable_model_paths=servable_model_paths(self._chip, self.config.topology),
            tags=list(self.config.tags),
            memory_bytes=self.config.offered_memory_bytes(),
        )

    async def start(self) -> None:
        """Binds, starts serving (health SERVING) and, with a cell, starts the join loop."""
        if self._cell is not None and self._store is None:
            self._store = open_store(resolve_sax_root(self.config.sax_root))
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        modelet_pb2_grpc.add_ModeletServicer_to_server(
            ModeletServicer(self.manager, self.server_id), server
        )
        lm_pb2_grpc.add_LMServiceServicer_to_server(
            LMServicer(self.manager, self._executor), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        bind = self.config.bind_address()
        try:
            port = server.add_insecure_port(bind)
        except RuntimeError as e:
            raise UnavailableError(f"cannot listen on {bind} ({e}); is the port in use?") from e
        if port == 0:
            raise UnavailableError(f"cannot listen on {bind}; is the port in use?")
        self._port = port
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("model server listening on %s (server id %s)", self.address, self.server_id)
        if self._cell is not None:
            self._join_task = asyncio.create_task(self._join_loop(), name="join-loop")

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, give in-flight ones `grace` seconds (default:
        the config's shutdown_grace_s), then unload every model."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        await self._health.enter_graceful_shutdown()
        if self._join_task is not None:
            self._join_task.cancel()
            await asyncio.gather(self._join_task, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace)
        await self.manager.close()
        self._executor.shutdown(wait=False)
        if self._admin_channel is not None:
            await self._admin_channel.close()
        logger.info("model server %s stopped", self.address)

    async def wait_for_termination(self) -> None:
        """Returns when the gRPC server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _join_loop(self) -> None:
        failing = False
        while True:
            try:
                admin_id, admin_address = await self.join_once()
                if failing or admin_id != self.joined_admin_id:
                    logger.info("joined admin %s of %s", admin_address, self._cell)
                self.joined_admin_id = admin_id
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - retried every period
                if not failing:
                    logger.warning(
                        "cannot join the admin of %s: %s; retrying every %gs",
                        self._cell,
                        _brief(e),
                        self.config.join_period_s,
                    )
                failing = True
            await asyncio.sleep(self.config.join_period_s)

    async def join_once(self) -> tuple[str, str]:
        """Reads the cell's location record and calls Join; returns (admin id, admin address)."""
        if self._cell is None or self._store is None:
            raise FailedPreconditionError("the server has no cell to join; pass --sax_cell")
        location = await asyncio.to_thread(sax_cell.read_location, self._store, self._cell)
        channel = await self._channel_to(location.location)
        request = admin_pb2.JoinRequest(
            address=self.address, model_server=self.model_server_info(), server_id=self.server_id
        )
        response = await admin_pb2_grpc.AdminStub(channel).Join(
            request, timeout=self.config.join_timeout_s
        )
        return response.admin_id or location.admin_id or location.location, location.location

    async def _channel_to(self, address: str) -> grpc.aio.Channel:
        if self._admin_channel is None or address != self._admin_address:
            if self._admin_channel is not None:
                await self._admin_channel.close()
            self._admin_channel = grpc.aio.insecure_channel(address)
            self._admin_address = address
        return self._admin_channel
