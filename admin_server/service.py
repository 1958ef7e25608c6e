"""The Admin gRPC service: a thin adapter from protos to `PublishedState` and `CellManager`.

While its admin is a standby (it does not hold the cell's lease) every RPC answers UNAVAILABLE
naming the leader, so clients re-read the location record and retry there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from admin_server.manager import CellManager
from admin_server.state import PublishedState
from sax.errors import InvalidArgumentError, NotFoundError, UnavailableError
from sax.rpc import handle_errors
from sax.v1 import admin_pb2, admin_pb2_grpc

logger = logging.getLogger(__name__)


class AdminService(admin_pb2_grpc.AdminServicer):
    """Answers publish, update, unpublish, list, stats, watch, wait-for-ready and join."""

    def __init__(
        self,
        admin_id: str,
        leader_hint: Callable[[], str] = lambda: "unknown",
        *,
        state: PublishedState | None = None,
        manager: CellManager | None = None,
    ) -> None:
        """leader_hint() says where the leader is, for standby answers."""
        self._admin_id = admin_id
        self._leader_hint = leader_hint
        self._state_obj = state
        self._manager_obj = manager

    def activate(self, state: PublishedState, manager: CellManager) -> None:
        """This admin leads: answer from state and manager."""
        self._state_obj, self._manager_obj = state, manager

    def deactivate(self) -> None:
        """This admin is a standby again: answer UNAVAILABLE."""
        self._state_obj, self._manager_obj = None, None

    def _standby(self) -> UnavailableError:
        return UnavailableError(
            f"admin {self._admin_id} is a standby; the leader is at {self._leader_hint()} "
            "(re-read the cell's location record and retry)"
        )

    @property
    def _state(self) -> PublishedState:
        if self._state_obj is None:
            raise self._standby()
        return self._state_obj

    @property
    def _manager(self) -> CellManager:
        manager = self._manager_obj
        if manager is None or manager.deposed:
            raise self._standby()
        return manager

    @handle_errors
    async def Publish(self, request: admin_pb2.PublishRequest, context: grpc.aio.ServicerContext):
        manager = self._manager  # a standby or deposed admin writes nothing
        await self._state.publish(request.model)
        manager.kick()
        await manager.notify_watchers()
        return admin_pb2.PublishResponse()

    @handle_errors
    async def Update(self, request: admin_pb2.UpdateRequest, context: grpc.aio.ServicerContext):
        manager = self._manager
        old = self._state.get(request.model.model_id)
        new = await self._state.update(request.model)
        manager.model_updated(old, new)
        return admin_pb2.UpdateResponse()

    @handle_errors
    async def Unpublish(
        self, request: admin_pb2.UnpublishRequest, context: grpc.aio.ServicerContext
    ):
        manager = self._manager
        await self._state.unpublish(request.model_id)
        manager.kick()
        await manager.notify_watchers()
        return admin_pb2.UnpublishResponse()

    @handle_errors
    async def List(self, request: admin_pb2.ListRequest, context: grpc.aio.ServicerContext):
        if request.model_id:
            models = [self._state.get(request.model_id)]
        else:
            models = [m for _, m in sorted(self._state.models().items())]
        return admin_pb2.ListResponse(
            published_models=[self._manager.published_model(m) for m in models]
        )

    @handle_errors
    async def Stats(self, request: admin_pb2.StatsRequest, context: grpc.aio.ServicerContext):
        if request.model_id:
            self._state.get(request.model_id)
        response = self._manager.stats(request.model_id)
        response.admin_id = self._admin_id
        return response

    @handle_errors
    async def WatchLoc(self, request: admin_pb2.WatchLocRequest, context: grpc.aio.ServicerContext):
        model_id = request.model_id
        state, manager = self._state, self._manager
        state.get(model_id)
        if not manager.ready_addresses(model_id) and manager.grace_remaining() > 0:
            # Just restarted: servers are rejoining. An empty set now would make clients drop
            # replicas that still serve, so wait for them (or for the grace period to end).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    manager.wait_changed(
                        lambda: manager.deposed or bool(manager.ready_addresses(model_id))
                    ),
                    timeout=manager.grace_remaining(),
                )
        last: frozenset[str] | None = None
        while True:
            if manager.deposed:
                raise self._standby()  # stepped down: the watcher re-resolves the leader
            if model_id not in state.models():
                yield admin_pb2.WatchLocResponse(admin_id=self._admin_id)
                raise NotFoundError(f"model {model_id} was unpublished")
            current = manager.ready_addresses(model_id)
            if current != last:
                last = current
                yield admin_pb2.WatchLocResponse(admin_id=self._admin_id, addresses=sorted(current))
            await manager.wait_changed(
                lambda seen=last: (
                    manager.deposed
                    or model_id not in state.models()
                    or manager.ready_addresses(model_id) != seen
                )
            )

    @handle_errors
    async def WaitForReady(
        self, request: admin_pb2.WaitForReadyRequest, context: grpc.aio.ServicerContext
    ):
        model_id = request.model_id
        if request.num_replicas < 0:
            raise InvalidArgumentError(f"num_replicas must be >= 0, got {request.num_replicas}")
        state, manager = self._state, self._manager
        state.get(model_id)
        await manager.wait_changed(
            lambda: (
                manager.deposed
                or model_id not in state.models()
                or len(manager.ready_addresses(model_id)) >= request.num_replicas
            )
        )
        if manager.deposed:
            raise self._standby()
        state.get(model_id)  # NOT_FOUND if it was unpublished meanwhile
        return admin_pb2.WaitForReadyResponse()

    @handle_errors
    async def Join(self, request: admin_pb2.JoinRequest, context: grpc.aio.ServicerContext):
        if not request.address:
            raise InvalidArgumentError("join needs the server's address")
        if request.draining:  # the server shuts down: stop listing it now
            await self._manager.leave(request.address, request.server_id)
        else:
            await self._manager.join(request)
        return admin_pb2.JoinResponse(admin_id=self._admin_id)
