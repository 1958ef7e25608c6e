"""The admin server process: gRPC server, location record, control loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from admin_server.config import AdminConfig
from admin_server.manager import CellManager
from admin_server.service import AdminService
from admin_server.state import PublishedState
from sax import cell as cell_layout
from sax.naming import parse_cell
from sax.storage import open_store
from sax.v1 import admin_pb2_grpc

logger = logging.getLogger(__name__)


class AdminServer:
    """Runs one cell's admin: restores the state, serves the Admin service, writes the location
    record, and runs the control loop until stopped."""

    def __init__(self, config: AdminConfig) -> None:
        self.config = config
        self.admin_id = secrets.token_hex(8)
        self._cell = parse_cell(config.sax_cell)
        self._store = open_store(config.sax_root)
        self._server: grpc.aio.Server | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._deposed = asyncio.Event()
        self._health = health.aio.HealthServicer()
        self.state = PublishedState(self._store, self._cell)
        self.manager: CellManager | None = None

    async def start(self) -> None:
        """Checks the cell, restores its state, binds the port and writes the location record."""
        cell_layout.read_config(self._store, self._cell)  # NOT_FOUND if never created
        self.state.restore()  # FAILED_PRECONDITION if corrupt
        self.manager = CellManager(self.config, self.state)
        self._server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(self.state, self.manager, self.admin_id), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        self.config = dataclasses.replace(self.config, port=port)
        await self._server.start()
        await asyncio.to_thread(
            cell_layout.write_location, self._store, self._cell, self.config.address, self.admin_id
        )
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._loop_task = asyncio.create_task(self.manager.run())
        self._watch_task = asyncio.create_task(self._watch_location())
        logger.info(
            "admin server of %s listening on %s (id %s, sax_root %s)",
            self._cell,
            self.config.address,
            self.admin_id,
            self._store.url,
        )

    async def wait(self) -> None:
        """Blocks until the server stops or another admin takes the cell over."""
        assert self._server is not None
        # Shielded: cancelling a wait_for_termination() would break the server's own stop().
        terminated = asyncio.ensure_future(asyncio.shield(self._server.wait_for_termination()))
        deposed = asyncio.ensure_future(self._deposed.wait())
        await asyncio.wait([terminated, deposed], return_when=asyncio.FIRST_COMPLETED)
        terminated.cancel()
        deposed.cancel()

    async def _watch_location(self) -> None:
        """Stops this admin when the location record names another one (a second admin was
        started for the cell): two admins must not both load and unload."""
        while True:
            await asyncio.sleep(self.config.poll_period_s)
            try:
                loc = await asyncio.to_thread(cell_layout.read_location, self._store, self._cell)
            except Exception as e:  # noqa: BLE001 - storage trouble: keep serving from memory
                logger.warning("could not read the location record of %s: %s", self._cell, e)
                continue
            if loc.admin_id != self.admin_id:
                logger.error(
                    "another admin (id %s at %s) took over cell %s; this one stops",
                    loc.admin_id,
                    loc.location,
                    self._cell,
                )
                if self.manager is not None:
                    self.manager.deposed = True
                self._deposed.set()
                return

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stops serving; the location record stays, so clients retry until a new admin runs."""
        await self._health.enter_graceful_shutdown()
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self.manager is not None:
            await self.manager.close()
        if self._server is not None:
            await self._server.stop(grace_s)
        logger.info("admin server of %s stopped", self._cell)
