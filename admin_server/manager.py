"""Converges what the servers have (observed state) to what is published (desired state).

One loop: poll every server's status each period, drop the dead, adopt what servers already have,
place missing replicas with the pure `placement.place`, issue loads and unloads, and publish the
LOADED replica addresses to watchers. Everything runs on one asyncio loop; state changes happen
between awaits, so no lock is needed beyond the one serializing reconcile passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc

from admin_server import placement
from admin_server.config import AdminConfig
from admin_server.server_pool import JoinedServer, ServerPool
from admin_server.state import PublishedState
from sax.errors import NotFoundError, SaxError
from sax.v1 import admin_pb2, common_pb2
from servables import platform

logger = logging.getLogger(__name__)

_ACTIVE = (common_pb2.LOADING, common_pb2.LOADED)
# Load errors that say the server went away, not that the model cannot load there.
_SERVER_TROUBLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (not just a call inside it)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return True if cancelling is None else cancelling() > 0


class CellManager:
    """The admin's control loop and the queries the RPC service answers."""

    def __init__(self, config: AdminConfig, state: PublishedState, fencing_token: int = 0) -> None:
        self._config = config
        self._state = state
        self._pool = ServerPool(config.poll_timeout_s, config.dead_after_s)
        self._pool.fencing_token = fencing_token  # the lease's; sent with every control call
        self._started = time.monotonic()
        # model_id -> addresses the model is assigned to (loading or loaded).
        self._assigned: dict[str, set[str]] = {}
        # model_id -> {address: reason} where loading it failed (for its current settings).
        self._failures: dict[str, dict[str, str]] = {}
        # (model_id, address) -> load or unload in flight.
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        # model_id -> LOADED addresses, as last published to watchers.
        self._ready: dict[str, frozenset[str]] = {}
        self._changed = asyncio.Condition()
        self._kick = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self.placement_changes = 0
        # Set when this admin lost the cell's lease: it issues no more loads or unloads.
        self.deposed = False

    # ----------------------------------------------------------------------------- loop

    def kick(self) -> None:
        """Asks for a reconcile pass as soon as possible."""
        self._kick.set()

    async def run(self) -> None:
        """The control loop; runs until cancelled."""
        next_poll = 0.0
        while True:
            timeout = max(0.0, next_poll - time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=timeout)
            self._kick.clear()
            if self.deposed:
                return
            try:
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self._config.poll_period_s
                    await self._poll_all()
                await self.reconcile()
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                logger.exception("a call of the control loop was cancelled; continuing")
            except Exception:
                logger.exception("reconcile pass failed; retrying at the next period")

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await self._pool.close()

    async def _poll_all(self) -> None:
        servers = list(self._pool.servers().values())
        await asyncio.gather(*(self._pool.poll(s) for s in servers))
        for server in servers:
            if server.restarted:
                server.restarted = False
                self._forget_server(server.address)
        for server in self._pool.drop_dead():
            await self._drop(server)

    async def _drop(self, server: JoinedServer) -> None:
        """Forgets a dead or draining server: its replicas, its calls in flight, its channel."""
        self._forget_server(server.address)
        for model_id, addresses in self._assigned.items():
            if server.address in addresses:
                addresses.discard(server.address)
                logger.info("replica of %s on dropped server %s is gone", model_id, server.address)
        for (model_id, address), task in list(self._tasks.items()):
            if address == server.address:
                task.cancel()
                self._tasks.pop((model_id, address), None)
        await server.channel.close()

    def _forget_server(self, address: str) -> None:
        """Forgets past load failures on a server that restarted or was dropped."""
        for failed in self._failures.values():
            failed.pop(address, None)

    # ----------------------------------------------------------------------------- joins

    async def join(self, request: admin_pb2.JoinRequest) -> None:
        """Registers a server; a new one is polled at once so what it has is adopted."""
        server, new = await self._pool.join(request)
        if new:
            self._forget_server(server.address)
        if new or not server.polled:
            await self._pool.poll(server)
            self.kick()

    async def leave(self, address: str, server_id: str) -> None:
        """A draining server leaves: clients stop getting its address at once (watchers are
        woken now, not at the next poll) and its replicas are placed elsewhere."""
        server = self._pool.remove(address, server_id)
        if server is None:
            return
        await self._drop(server)
        ready = {m: a - {address} for m, a in self._ready.items()}
        if ready != self._ready:
            self._ready = ready
            await self.notify_watchers()
        self.kick()

    # ----------------------------------------------------------------------------- reconcile

    async def reconcile(self) -> None:
        """One pass: adopt, clean up failures, place, load/unload, publish addresses."""
        async with self._reconcile_lock:
            models = self._state.models()
            live = {a: s for a, s in self._pool.servers().items() if s.polled}
            if self.deposed:
                return
            self._forget_gone(models, live)
            self._prune_missing(live)
            self._adopt(models, live)
            self._collect_failures(live)
            if time.monotonic() - self._started >= self._config.adopt_grace_s:
                self._place(models, live)
            self._reload_changed(models, live)
            await self._publish_addresses(models, live)

    def _busy(self, model_id: str, address: str) -> bool:
        task = self._tasks.get((model_id, address))
        return task is not None and not task.done()

    def _forget_gone(
        self, models: dict[str, admin_pb2.Model], live: dict[str, JoinedServer]
    ) -> None:
        for model_id in list(self._assigned):
            if model_id not in models:
                for address in self._assigned.pop(model_id):
                    if address in live:
                        self._start_unload(live[address], model_id)
                self._failures.pop(model_id, None)
                continue
            self._assigned[model_id] &= set(self._pool.servers())

    def _prune_missing(self, live: dict[str, JoinedServer]) -> None:
        """Forgets assignments a server no longer reports (unloaded, or lost in a restart) with
        nothing in flight, so that placement loads them again."""
        for model_id, addresses in self._assigned.items():
            for address in sorted(addresses):
                server = live.get(address)
                if (
                    server is not None
                    and model_id not in server.models
                    and not self._busy(model_id, address)
                ):
                    addresses.discard(address)

    def _adopt(self, models: dict[str, admin_pb2.Model], live: dict[str, JoinedServer]) -> None:
        for address, server in live.items():
            for model_id, info in server.models.items():
                if self._busy(model_id, address):
                    continue
                assigned = (
                    self._assigned.setdefault(model_id, set()) if model_id in models else None
                )
                if assigned is None:
                    if info.status != common_pb2.UNLOADING:
                        logger.info("unloading unpublished %s from %s", model_id, address)
                        self._start_unload(server, model_id)
                elif info.status in _ACTIVE and address not in assigned:
                    logger.info(
                        "adopted replica of %s on %s (%s)",
                        model_id,
                        address,
                        common_pb2.ModelStatus.Name(info.status),
                    )
                    assigned.add(address)

    def _collect_failures(self, live: dict[str, JoinedServer]) -> None:
        for model_id, addresses in self._assigned.items():
            for address in sorted(addresses):
                info = live[address].models.get(model_id) if address in live else None
                if (
                    info is not None
                    and info.status == common_pb2.FAILED
                    and not self._busy(model_id, address)
                ):
                    logger.warning(
                        "load of %s failed on %s: %s", model_id, address, info.failure_reason
                    )
                    self._failures.setdefault(model_id, {})[address] = info.failure_reason
                    addresses.discard(address)
                    self._start_unload(live[address], model_id)

    def _place(self, models: dict[str, admin_pb2.Model], live: dict[str, JoinedServer]) -> None:
        specs = []
        for model_id, model in sorted(models.items()):
            try:
                config = self._state.config_of(model)
                memory = config.memory_bytes()
            except SaxError as e:
                logger.error("cannot place %s: %s", model_id, e)
                continue
            specs.append(
                placement.ModelSpec(
                    model_id=model_id,
                    model_path=model.model_path,
                    replicas=model.requested_num_replicas,
                    memory_bytes=memory,
                    num_devices=config.num_devices(),
                )
            )
        servers = [
            placement.ServerSpec(
                address=a,
                servable_model_paths=frozenset(s.spec.servable_model_paths),
                memory_bytes=s.spec.memory_bytes,
                tags=frozenset(s.spec.tags),
                num_devices=_topology_devices(s.spec.chip_topology),
            )
            for a, s in sorted(live.items())
        ]
        current = {
            m: [
                placement.Replica(
                    address=a,
                    loaded=(info := live[a].models.get(m)) is not None
                    and info.status == common_pb2.LOADED,
                )
                for a in sorted(addresses)
                if a in live
            ]
            for m, addresses in self._assigned.items()
        }
        result = placement.place(
            specs, servers, current, self._failures, self._config.max_load_failures
        )
        loads, unloads = placement.diff(
            {m: {r.address for r in rs} for m, rs in current.items()}, result.assignments
        )
        for model_id, address in unloads:
            self._assigned.get(model_id, set()).discard(address)
            self._start_unload(live[address], model_id)
        for model_id, address in loads:
            self._assigned.setdefault(model_id, set()).add(address)
            self._start_load(live[address], models[model_id])
        if loads or unloads:
            self.placement_changes += 1
            logger.info("placement: load %s, unload %s", loads, unloads)
        for model_id, missing in sorted(result.unplaced.items()):
            logger.debug("%s is short of %d replicas (no server fits)", model_id, missing)

    def _reload_changed(
        self, models: dict[str, admin_pb2.Model], live: dict[str, JoinedServer]
    ) -> None:
        """Reloads replicas whose checkpoint or overrides differ from the published ones, one
        replica of a model at a time so the others keep serving."""
        for model_id, addresses in self._assigned.items():
            model = models.get(model_id)
            if (
                model is None
                or any(self._busy(model_id, a) for a in addresses)
                or len(self._failures.get(model_id, ())) >= self._config.max_load_failures
            ):
                continue
            want = (model.checkpoint_path, tuple(sorted(model.overrides.items())))
            for address in sorted(addresses):
                info = live[address].models.get(model_id) if address in live else None
                if (
                    info is not None
                    and info.status == common_pb2.LOADED
                    and ((info.checkpoint_path, info.overrides) != want)
                ):
                    logger.info(
                        "reloading %s on %s with checkpoint %s",
                        model_id,
                        address,
                        model.checkpoint_path,
                    )
                    self._start_load(live[address], model)
                    break

    def model_updated(self, old: admin_pb2.Model, new: admin_pb2.Model) -> None:
        """Forgets past load failures when the settings that failed have changed."""
        if (old.checkpoint_path, dict(old.overrides)) != (new.checkpoint_path, dict(new.overrides)):
            self._failures.pop(new.model_id, None)
        self.kick()

    # ----------------------------------------------------------------------------- actions

    def _start_load(self, server: JoinedServer, model: admin_pb2.Model) -> None:
        key = (model.model_id, server.address)
        if self._busy(*key) or self.deposed:
            return
        self._tasks[key] = asyncio.create_task(self._load(server, model))

    async def _load(self, server: JoinedServer, model: admin_pb2.Model) -> None:
        started = time.monotonic()
        logger.info("loading %s on %s", model.model_id, server.address)
        err = await self._pool.load(server, model, self._config.load_timeout_s)
        await self._pool.poll(server)
        if err is None:
            logger.info(
                "loaded %s on %s in %.2f s",
                model.model_id,
                server.address,
                time.monotonic() - started,
            )
        else:
            logger.warning("load of %s on %s failed: %s", model.model_id, server.address, err)
            if err.code in _SERVER_TROUBLE:
                await asyncio.sleep(self._config.poll_period_s)  # no tight retry loop
            info = server.models.get(model.model_id)
            if err.code not in _SERVER_TROUBLE and (
                info is None or info.status != common_pb2.FAILED
            ):
                # A refused load with no FAILED status to collect: count it here. A server that
                # went away or timed out is not the model's fault and is not counted.
                self._failures.setdefault(model.model_id, {})[server.address] = str(err)
                self._assigned.get(model.model_id, set()).discard(server.address)
        self._tasks.pop((model.model_id, server.address), None)
        self.kick()

    def _start_unload(self, server: JoinedServer, model_id: str) -> None:
        key = (model_id, server.address)
        if self._busy(*key) or self.deposed:
            return
        self._tasks[key] = asyncio.create_task(self._unload(server, model_id))

    async def _unload(self, server: JoinedServer, model_id: str) -> None:
        logger.info("unloading %s from %s", model_id, server.address)
        err = await self._pool.unload(server, model_id)
        if err is not None and not isinstance(err, NotFoundError):
            logger.warning("unload of %s from %s failed: %s", model_id, server.address, err)
            # Stay busy for a period: an unreachable server is retried at the poll rate, not in
            # a tight loop, until it answers or is dropped.
            await asyncio.sleep(self._config.poll_period_s)
        await self._pool.poll(server)
        self._tasks.pop((model_id, server.address), None)
        self.kick()

    # ----------------------------------------------------------------------------- addresses

    async def _publish_addresses(
        self, models: dict[str, admin_pb2.Model], live: dict[str, JoinedServer]
    ) -> None:
        ready: dict[str, frozenset[str]] = {}
        for model_id in models:
            ready[model_id] = frozenset(
                a
                for a in self._assigned.get(model_id, ())
                if a in live
                and (info := live[a].models.get(model_id)) is not None
                and info.status == common_pb2.LOADED
            )
        if ready != self._ready:
            self._ready = ready
            async with self._changed:
                self._changed.notify_all()

    def grace_remaining(self) -> float:
        """Seconds left of the start-up period in which servers rejoin and are adopted."""
        return max(0.0, self._config.adopt_grace_s - (time.monotonic() - self._started))

    def ready_addresses(self, model_id: str) -> frozenset[str]:
        """LOADED replica addresses of a model (empty if none or unknown)."""
        return self._ready.get(model_id, frozenset())

    async def wait_changed(self, predicate: Callable[[], bool]) -> None:
        """Waits until predicate() holds; re-checked after every address change."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def notify_watchers(self) -> None:
        """Wakes every watcher (after a publish or unpublish)."""
        async with self._changed:
            self._changed.notify_all()

    # ----------------------------------------------------------------------------- queries

    def published_model(self, model: admin_pb2.Model) -> admin_pb2.PublishedModel:
        """A model with its replicas, for List."""
        shown = admin_pb2.Model()
        shown.CopyFrom(model)
        shown.ClearField("uuid")
        servers = self._pool.servers()
        replicas = []
        methods: set[str] = set()
        for address in sorted(self._assigned.get(model.model_id, ())):
            info = servers[address].models.get(model.model_id) if address in servers else None
            status = info.status if info is not None else common_pb2.LOADING
            if info is not None:
                methods.update(info.method_names)
            replicas.append(
                admin_pb2.ReplicaStatus(
                    address=address,
                    status=status,
                    failure_reason=info.failure_reason if info else "",
                )
            )
        for address, reason in sorted(self._failures.get(model.model_id, {}).items()):
            replicas.append(
                admin_pb2.ReplicaStatus(
                    address=address,
                    status=common_pb2.FAILED,
                    failure_reason=reason or "load failed",
                )
            )
        shown.method_names.extend(sorted(methods))
        return admin_pb2.PublishedModel(
            model=shown,
            modelet_addresses=sorted(self.ready_addresses(model.model_id)),
            replicas=replicas,
        )

    def stats(self, model_id: str) -> admin_pb2.StatsResponse:
        """Server counts by platform (of the model's replicas, or of every server)."""
        servers = self._pool.servers()
        chosen = (
            [servers[a] for a in sorted(self._assigned.get(model_id, ())) if a in servers]
            if model_id
            else [servers[a] for a in sorted(servers)]
        )
        counts: dict[tuple[str, str], int] = {}
        by_path: dict[str, int] = {}
        for s in chosen:
            key = (s.spec.chip_type, s.spec.chip_topology)
            counts[key] = counts.get(key, 0) + 1
            for path in s.spec.servable_model_paths:
                by_path[path] = by_path.get(path, 0) + 1
        models = self._state.models()
        response = admin_pb2.StatsResponse(
            model_server_type_stats=[
                admin_pb2.ModelServerTypeStat(chip_type=c, chip_topology=t, num_replicas=n)
                for (c, t), n in sorted(counts.items())
            ],
            num_servers_by_servable_model_path=by_path,
        )
        for s in chosen:
            used = 0
            for m, addresses in self._assigned.items():
                if s.address in addresses and m in models:
                    with contextlib.suppress(SaxError):
                        used += self._state.config_of(models[m]).memory_bytes()
            response.servers.append(s.to_proto(used))
        return response

    def num_servers(self) -> int:
        return len(self._pool.servers())


def _topology_devices(topology: str) -> int:
    """Devices of a server's chip topology; 0 when it is malformed (no mesh check then)."""
    try:
        return platform.num_devices(topology)
    except SaxError:
        return 0
