"""The admin server process: gRPC server, leader lease, location record, control loop.

Several admins may run for one cell. Each starts as a standby (health NOT_SERVING, Admin RPCs
UNAVAILABLE naming the leader) and polls the cell's lease (`admin_server/lease.py`). The one that
acquires it restores the published state, writes the location record (clients and model servers
find the leader through it), adopts what the model servers already have loaded and serves. The
leader renews the lease every `lease_renew_s`; when it cannot renew before the lease runs out
(storage unreachable, or another admin holds it now) it steps down at once: no more loads or
unloads, RPCs UNAVAILABLE, health NOT_SERVING, and it goes back to being a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from admin_server.config import AdminConfig
from admin_server.lease import LEASE_FILE, Lease, LeaseRecord, Renewal
from admin_server.manager import CellManager
from admin_server.service import AdminService
from admin_server.state import PublishedState
from sax import cell as cell_layout
from sax.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    SaxError,
    UnavailableError,
)
from sax.naming import parse_cell
from sax.storage import join, open_store
from sax.v1 import admin_pb2_grpc

logger = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


class AdminServer:
    """Runs one admin of a cell: standby until it holds the cell's lease, then leader.

    `start()` returns as the leader when the lease was free (or held by a predecessor that is
    gone), else as a standby that keeps polling the lease in the background.
    """

    def __init__(self, config: AdminConfig) -> None:
        if not config.lease_s > 2 * config.clock_skew_s >= 0:
            raise InvalidArgumentError(
                f"--lease_s ({config.lease_s}) must be more than twice --clock_skew_s "
                f"({config.clock_skew_s})"
            )
        if not 0 < config.lease_renew_s < config.lease_s - config.clock_skew_s:
            raise InvalidArgumentError(
                f"--lease_renew_s ({config.lease_renew_s}) must be positive and less than "
                f"--lease_s minus --clock_skew_s ({config.lease_s - config.clock_skew_s})"
            )
        self.config = config
        self.admin_id = secrets.token_hex(8)
        self._cell = parse_cell(config.sax_cell)
        self._store = open_store(config.sax_root)
        self._server: grpc.aio.Server | None = None
        self._run_task: asyncio.Task[None] | None = None
        # The latest lease acquisition or renewal run in a storage thread: stop() awaits it, as
        # cancelling the task that waits for it does not stop the thread.
        self._lease_call: asyncio.Future[Any] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._fatal: SaxError | None = None
        self._failed = asyncio.Event()
        self._health = health.aio.HealthServicer()
        self._lease: Lease | None = None
        self._service = AdminService(self.admin_id, self._leader_hint)
        self._last_seen_leader = "unknown"
        # Set while this admin leads.
        self.state: PublishedState | None = None
        self.manager: CellManager | None = None
        # Times this admin became the leader.
        self.terms = 0

    @property
    def is_leader(self) -> bool:
        """Whether this admin leads the cell now."""
        return self.manager is not None and not self.manager.deposed

    @property
    def fencing(self) -> int:
        """The fencing number of the lease this admin holds (0 when standby)."""
        return self._lease.fencing if self._lease is not None and self.is_leader else 0

    def _leader_hint(self) -> str:
        return self._last_seen_leader

    async def start(self) -> None:
        """Checks the cell and its state, binds the port as a standby, and takes the lease if
        it is free (then leads before returning)."""
        cell_layout.read_config(self._store, self._cell)  # NOT_FOUND if never created
        # FAILED_PRECONDITION if corrupt: refuse to start rather than wait to lead on it.
        await asyncio.to_thread(PublishedState(self._store, self._cell).check_saved)
        # No SO_REUSEPORT: binding the port proves that no other process serves it, which lets
        # an admin restarted on its own address take the lease over at once.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        admin_pb2_grpc.add_AdminServicer_to_server(self._service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        bind = f"{self.config.host}:{self.config.port}"
        try:
            port = self._server.add_insecure_port(bind)
        except RuntimeError as e:
            raise UnavailableError(f"cannot listen on {bind} ({e}); is the port in use?") from e
        self.config = dataclasses.replace(self.config, port=port)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        self._lease = Lease(
            self._store,
            join(cell_layout.cell_dir(self._cell), LEASE_FILE),
            self.admin_id,
            self.config.address,
            lease_s=self.config.lease_s,
            clock_skew_s=self.config.clock_skew_s,
        )
        logger.info(
            "admin server of %s listening on %s (id %s, sax_root %s); standby until it holds "
            "the lease",
            self._cell,
            self.config.address,
            self.admin_id,
            self._store.url,
        )
        if await self._try_acquire():
            await self._lead()
        self._run_task = asyncio.create_task(self._run(), name="admin-lease")

    async def wait(self) -> None:
        """Blocks until the server stops; raises the error that made this admin give up (e.g.
        a corrupt state found when taking over)."""
        assert self._server is not None
        # Shielded: cancelling a wait_for_termination() would break the server's own stop().
        terminated = asyncio.ensure_future(asyncio.shield(self._server.wait_for_termination()))
        failed = asyncio.ensure_future(self._failed.wait())
        await asyncio.wait([terminated, failed], return_when=asyncio.FIRST_COMPLETED)
        terminated.cancel()
        failed.cancel()
        if self._fatal is not None:
            raise self._fatal

    # ----------------------------------------------------------------------------- lease

    def _predecessor_gone(self, record: LeaseRecord) -> bool:
        """A holder that advertised this admin's own address is dead: this process bound that
        port exclusively. Only when the address is the bound host itself (not a wildcard or an
        advertised name that several admins may share)."""
        return (
            not self.config.advertise_host
            and self.config.host not in _WILDCARD_HOSTS
            and record.address == self.config.address
        )

    async def _try_acquire(self) -> bool:
        assert self._lease is not None
        try:
            # Shielded: when stop() cancels this wait, the thread may still take the lease;
            # stop() then awaits its outcome and gives the lease back.
            acquiring = asyncio.ensure_future(
                asyncio.to_thread(self._lease.try_acquire, self._predecessor_gone)
            )
            self._lease_call = acquiring
            won = await asyncio.shield(acquiring)
            if not won:
                record = await asyncio.to_thread(self._lease.read)
                if record is not None and record.address:
                    self._last_seen_leader = record.address
        except Exception as e:  # noqa: BLE001 - storage trouble: keep trying
            logger.warning("could not read the lease of %s: %s", self._cell, e)
            return False
        return won

    async def _run(self) -> None:
        """Standby -> leader -> (lease lost) -> standby ..., until stopped or a fatal error."""
        try:
            while True:
                if not self.is_leader:
                    while not await self._try_acquire():
                        await asyncio.sleep(self.config.standby_poll_s)
                    try:
                        await self._lead()
                    except FailedPreconditionError:
                        raise
                    except Exception:  # storage trouble: standby again, retry
                        logger.exception("could not take cell %s over; retrying", self._cell)
                        await asyncio.sleep(self.config.standby_poll_s)
                        continue
                await self._hold()
                await self._step_down("lost the lease")
        except FailedPreconditionError as e:  # e.g. a corrupt state: no admin can lead on it
            self._fatal = e
            self._failed.set()

    async def _lead(self) -> None:
        """Holding the lease: restore the state, write the location record, serve."""
        assert self._lease is not None
        started = time.monotonic()
        state = PublishedState(self._store, self._cell, may_write=self._lease.held)
        try:
            await asyncio.to_thread(state.restore)
        except Exception as e:
            logger.error("cannot lead cell %s: %s; giving the lease back", self._cell, e)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._lease.release)
            raise
        manager = CellManager(self.config, state, fencing_token=self._lease.fencing)
        self.state, self.manager = state, manager
        self._service.activate(state, manager)
        try:
            await asyncio.to_thread(
                cell_layout.write_location,
                self._store,
                self._cell,
                self.config.address,
                self.admin_id,
            )
        except Exception as e:  # noqa: BLE001 - rewritten at the next renewal
            logger.warning("could not write the location record of %s: %s", self._cell, e)
        self._last_seen_leader = self.config.address
        self._loop_task = asyncio.create_task(manager.run(), name="admin-control-loop")
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.terms += 1
        logger.info(
            "admin %s leads cell %s at %s (fencing %d), ready in %.2f s",
            self.admin_id,
            self._cell,
            self.config.address,
            self._lease.fencing,
            time.monotonic() - started,
        )

    async def _hold(self) -> None:
        """Renews the lease until it is lost; returns at once when it is (or runs out while
        storage does not answer)."""
        assert self._lease is not None
        lease = self._lease
        renewal: asyncio.Future[Renewal] | None = None
        while True:
            remaining = lease.valid_until - time.monotonic()
            if remaining <= 0:
                lease.abandon()
                return
            if renewal is None:
                renewal = asyncio.ensure_future(asyncio.to_thread(lease.renew))
                self._lease_call = renewal
            done, _ = await asyncio.wait({renewal}, timeout=remaining)
            if not done:
                lease.abandon()  # storage too slow: the lease ran out while waiting
                return
            outcome = renewal.result()
            renewal = None
            if outcome is Renewal.LOST:
                return
            if outcome is Renewal.RENEWED:
                # Bounded: a hanging storage call must not keep this loop from stepping down.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._check_location(),
                        timeout=max(0.0, lease.valid_until - time.monotonic()),
                    )
                pause = self.config.lease_renew_s
            else:
                pause = min(self.config.lease_renew_s, self.config.standby_poll_s)
            await asyncio.sleep(min(pause, max(0.0, lease.valid_until - time.monotonic())))

    async def _check_location(self) -> None:
        """Rewrites the location record if it does not name this leader (only the lease holder
        writes it)."""
        try:
            loc = await asyncio.to_thread(cell_layout.read_location, self._store, self._cell)
            if loc.admin_id == self.admin_id and loc.location == self.config.address:
                return
        except Exception as e:  # noqa: BLE001 - rewritten below
            logger.debug("location record of %s unreadable: %s", self._cell, e)
        logger.warning("location record of %s does not name this leader; rewriting", self._cell)
        try:
            await asyncio.to_thread(
                cell_layout.write_location,
                self._store,
                self._cell,
                self.config.address,
                self.admin_id,
            )
        except Exception as e:  # noqa: BLE001 - retried at the next renewal
            logger.warning("could not rewrite the location record of %s: %s", self._cell, e)

    async def _step_down(self, why: str, level: int = logging.ERROR) -> None:
        """Stops acting as the leader at once; this admin is a standby again."""
        manager = self.manager
        if manager is None:
            return
        manager.deposed = True  # no load or unload from here on
        self._service.deactivate()
        logger.log(level, "admin %s steps down as leader of %s: %s", self.admin_id, self._cell, why)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await manager.notify_watchers()  # open WatchLoc streams end with UNAVAILABLE
        if self._loop_task is not None:
            await _cancel_and_wait(self._loop_task, "the control loop")
            self._loop_task = None
        await manager.close()
        self.state, self.manager = None, None

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stops serving and gives the lease up, so a standby takes over at once. The location
        record stays: clients retry until the next leader rewrites it."""
        await self._health.enter_graceful_shutdown()
        if self._run_task is not None:
            await _cancel_and_wait(self._run_task, "the leader loop")
        # An acquisition cut short may still take the lease, and a renewal still in flight would
        # make the release's compare-and-swap miss: wait for either (bounded: a call started
        # more than lease_s ago grants nothing anyway).
        if self._lease_call is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._lease_call), self.config.lease_s)
        await self._step_down("stopping", logging.INFO)
        # Whenever this admin has a holding (fencing > 0), even one that ran out meanwhile: the
        # release is a compare-and-swap, so it changes nothing if another admin took over.
        if self._lease is not None and self._lease.fencing:
            try:
                await asyncio.to_thread(self._lease.release)
            except Exception as e:  # noqa: BLE001 - the lease then runs out by itself
                logger.warning("could not release the lease of %s: %s", self._cell, e)
        if self._server is not None:
            await self._server.stop(grace_s)
        logger.info("admin server of %s stopped", self._cell)


async def _cancel_and_wait(task: asyncio.Task[Any], what: str, timeout_s: float = 5.0) -> None:
    """Cancels `task` and waits for it to end, at most timeout_s: stopping never hangs on a
    task stuck in a call that ignores cancellation (it is logged and left behind)."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        logger.error("%s did not stop within %.0f s of being cancelled", what, timeout_s)
    elif not task.cancelled() and task.exception() is not None:
        logger.warning("%s ended with %r", what, task.exception())
