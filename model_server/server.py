"""`ModelServer`: the grpc.aio server (Modelet, LMService, health) and the join loop.

Every `join_period_s` the server reads its cell's location record and calls Admin.Join with its
address, server id and platform. Join is idempotent on the admin side, so sending it every period
is how the server finds a restarted or new admin; errors (no admin yet, admin down) are logged
once per outage and retried.

`stop()` drains gracefully: health NOT_SERVING at once, a last Join with `draining` so the admin
stops listing this server to clients at once, new LM calls answered UNAVAILABLE (clients retry
another replica), calls in flight given the grace period to finish, then the models unloaded.

A watchdog turns health NOT_SERVING while a model has requests but its engine has not finished a
step (no token out) for `stall_timeout_s`, with the reason in GetStatus (`health_reason`) and
the log, and back to SERVING once tokens flow again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from model_server.config import ModelServerConfig, host_port
from model_server.loader import build_servable
from model_server.metrics import ModelSample, ModelServerMetrics
from model_server.model_manager import Builder, ModelManager
from model_server.services.lm_service import CallTracker, LMServicer
from model_server.services.modelet_service import ModeletServicer
from sax import cell as sax_cell
from sax.errors import FailedPreconditionError, SaxError, UnavailableError
from sax.naming import CellName, parse_cell
from sax.storage import Store, open_store, resolve_sax_root
from sax.v1 import admin_pb2, admin_pb2_grpc, lm_pb2, lm_pb2_grpc, modelet_pb2, modelet_pb2_grpc
from servables import platform, registry

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    modelet_pb2.DESCRIPTOR.services_by_name["Modelet"].full_name,
    lm_pb2.DESCRIPTOR.services_by_name["LMService"].full_name,
)


def servable_model_paths(chip: str, topology: str, backend: str = "torch") -> list[str]:
    """Registered config names this platform can host, sorted. With the JAX backend a Llama
    config of the chip is listed whatever its default mesh: it serves on this server when
    published with an ICI_MESH_SHAPE of the topology's device count (the admin checks that)."""
    from servables.configs.llama import LlamaConfig
    from servables.decoder_config import DecoderConfig

    names = []
    for name in registry.names():
        config = registry.get(name)
        jax_decoder = backend == "jax" and isinstance(config, DecoderConfig)
        if jax_decoder and not isinstance(config, LlamaConfig):
            continue  # the JAX engine serves Llama only
        shardable = backend == "jax" and isinstance(config, LlamaConfig) and chip in config.chips
        if shardable or config.can_serve_on(chip, topology):
            names.append(name)
    return names


HEALTH = health_pb2.HealthCheckResponse
# Health service names that follow readiness (the Modelet service stays SERVING so the admin can
# still unload a stalled model).
_READINESS_NAMES = ("", SERVICE_NAMES[1])
DRAINING = "draining: the server is shutting down"
# Seconds stop() waits for the models to unload (a hung device step would hold it forever).
UNLOAD_AT_STOP_S = 15.0


class _Modelet(ModeletServicer):
    """The Modelet service, with the server's health reason in GetStatus."""

    def __init__(self, server: ModelServer) -> None:
        super().__init__(server.manager, server.server_id)
        self._server = server

    async def GetStatus(
        self, request: modelet_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> modelet_pb2.GetStatusResponse:
        response = await super().GetStatus(request, context)
        if response is not None:
            response.health_reason = self._server.health_reason
        return response


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
        if builder is build_servable:
            builder = functools.partial(
                build_servable, chip=self._chip, backend=config.resolved_backend()
            )
        self.manager = ModelManager(self._chip, config.topology, builder=builder)
        self.metrics = ModelServerMetrics(self._model_samples, lambda: self.calls.in_flight)
        self.calls = CallTracker(self.metrics)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._port = 0
        self.metrics_port = 0
        self._join_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._admin_channel: grpc.aio.Channel | None = None
        self._admin_address = ""
        self._stopping = False
        # Id of the admin this server last joined ("" before the first join).
        self.joined_admin_id = ""
        # Why health is NOT_SERVING ("" while SERVING); shown in GetStatus.
        self.health_reason = ""

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
            servable_model_paths=servable_model_paths(
                self._chip, self.config.topology, self.config.resolved_backend()
            ),
            tags=list(self.config.tags),
            memory_bytes=self.config.offered_memory_bytes(),
        )

    async def start(self) -> None:
        """Binds, starts serving (health SERVING) and, with a cell, starts the join loop."""
        if self._cell is not None and self._store is None:
            self._store = open_store(resolve_sax_root(self.config.sax_root))
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        modelet_pb2_grpc.add_ModeletServicer_to_server(_Modelet(self), server)
        lm_pb2_grpc.add_LMServiceServicer_to_server(
            LMServicer(self.manager, self._executor, self.calls), server
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
            await self._health.set(name, HEALTH.SERVING)
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        logger.info("model server listening on %s (server id %s)", self.address, self.server_id)
        if self._cell is not None:
            self._join_task = asyncio.create_task(self._join_loop(), name="join-loop")
        if self.config.stall_timeout_s > 0:
            self._watchdog_task = asyncio.create_task(self._watchdog(), name="stall-watchdog")

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health NOT_SERVING, the admin told (a Join with `draining`), new LM calls
        refused with UNAVAILABLE, in-flight ones given `grace` seconds (default: the config's
        shutdown_grace_s) to finish; then the models are unloaded."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        self.calls.drain()
        self.health_reason = DRAINING
        await self._health.enter_graceful_shutdown()
        for task in (self._join_task, self._watchdog_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        in_flight = self.calls.in_flight
        logger.info("draining: %d calls in flight get %gs", in_flight, grace)
        await self._leave_cell()
        if not await self.calls.wait_idle(deadline - time.monotonic()):
            logger.warning(
                "grace period of %gs over with %d calls still running; they are cancelled",
                grace,
                self.calls.in_flight,
            )
        elif in_flight:
            logger.info("drained: the %d calls in flight finished", in_flight)
        if self._server is not None:
            await self._server.stop(max(0.0, min(1.0, deadline - time.monotonic())))
        await asyncio.to_thread(self.metrics.close)  # joins the HTTP thread
        try:
            await asyncio.wait_for(self.manager.close(), UNLOAD_AT_STOP_S)
        except asyncio.TimeoutError:
            logger.warning(
                "the models did not unload within %gs; stopping anyway", UNLOAD_AT_STOP_S
            )
        self._executor.shutdown(wait=False)
        if self._admin_channel is not None:
            await self._admin_channel.close()
        logger.info("model server %s stopped", self.address)

    async def _leave_cell(self) -> None:
        """Tells the admin this server drains, so it lists it no more (best effort)."""
        if self._cell is None or not self.joined_admin_id:
            return
        try:
            admin_id, _ = await self.join_once(draining=True, timeout=2.0)
            logger.info("told admin %s that this server drains", admin_id)
        except Exception as e:  # noqa: BLE001 - the admin finds out at its next poll
            logger.warning("could not tell the admin that this server drains: %s", _brief(e))

    # Readiness.

    def _model_samples(self) -> Iterator[ModelSample]:
        """The loaded models for metrics (called from the metrics thread)."""
        load_seconds = dict(self.manager.load_seconds)
        for key, servable in self.manager.servables():
            stats = getattr(servable, "stats", None)
            yield ModelSample(key, load_seconds.get(key), stats() if callable(stats) else None)

    def stall_reason(self, now: float | None = None) -> str:
        """Why the server cannot make progress ("" when it can): the channel to the other
        processes of a multi-process model broke, or a model with requests whose engine has
        finished no step for stall_timeout_s."""
        from model_server.backends.jax import multihost

        leader = multihost.current_leader()
        if leader is not None and leader.lost:
            return f"broken: {leader.lost}"
        now = time.monotonic() if now is None else now
        limit = self.config.stall_timeout_s
        for key, _, stats in self._model_samples():
            if stats is None or not (stats.running or stats.waiting):
                continue
            idle = now - stats.last_progress
            if limit > 0 and idle > limit:
                return (
                    f"stalled: model {key} has {stats.running} requests running and "
                    f"{stats.waiting} waiting, and no token came out for {idle:.0f}s "
                    f"(--stall_timeout_s={limit:g})"
                )
        return ""

    async def _watchdog(self) -> None:
        period = min(1.0, self.config.stall_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                reason = self.stall_reason()
            except Exception:
                logger.exception("the stall check failed")
                continue
            if self._stopping:
                return
            was_stalled, self.health_reason = bool(self.health_reason), reason
            if bool(reason) == was_stalled:
                continue
            if reason:
                logger.error("NOT_SERVING: %s", reason)
                status = HEALTH.NOT_SERVING
            else:
                logger.warning("SERVING again: tokens flow")
                status = HEALTH.SERVING
            for name in _READINESS_NAMES:
                await self._health.set(name, status)

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

    async def join_once(
        self, *, draining: bool = False, timeout: float | None = None
    ) -> tuple[str, str]:
        """Reads the cell's location record and calls Join; returns (admin id, admin address).
        `draining` tells the admin this server is going away."""
        if self._cell is None or self._store is None:
            raise FailedPreconditionError("the server has no cell to join; pass --sax_cell")
        location = await asyncio.to_thread(sax_cell.read_location, self._store, self._cell)
        channel = await self._channel_to(location.location)
        request = admin_pb2.JoinRequest(
            address=self.address,
            model_server=self.model_server_info(),
            server_id=self.server_id,
            draining=draining,
        )
        response = await admin_pb2_grpc.AdminStub(channel).Join(
            request, timeout=self.config.join_timeout_s if timeout is None else timeout
        )
        return response.admin_id or location.admin_id or location.location, location.location

    async def _channel_to(self, address: str) -> grpc.aio.Channel:
        if self._admin_channel is None or address != self._admin_address:
            if self._admin_channel is not None:
                await self._admin_channel.close()
            self._admin_channel = grpc.aio.insecure_channel(address)
            self._admin_address = address
        return self._admin_channel
