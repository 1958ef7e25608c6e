"""The Admin gRPC service: a thin adapter from protos to `PublishedState` and `CellManager`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from admin_server.manager import CellManager
from admin_server.state import PublishedState
from sax.errors import InvalidArgumentError, NotFoundError
from sax.rpc import handle_errors
from sax.v1 import admin_pb2, admin_pb2_grpc

logger = logging.getLogger(__name__)


class AdminService(admin_pb2_grpc.AdminServicer):
    """Answers publish, update, unpublish, list, stats, watch, wait-for-ready and join."""

    def __init__(self, state: PublishedState, manager: CellManager, admin_id: str) -> None:
        self._state = state
        self._manager = manager
        self._admin_id = admin_id

    @handle_errors
    async def Publish(self, request: admin_pb2.PublishRequest, context: grpc.aio.ServicerContext):
        await self._state.publish(request.model)
        self._manager.kick()
        await self._manager.notify_watchers()
        return admin_pb2.PublishResponse()

    @handle_errors
    async def Update(self, request: admin_pb2.UpdateRequest, context: grpc.aio.ServicerContext):
        old = self._state.get(request.model.model_id)
        new = await self._state.update(request.model)
        self._manager.model_updated(old, new)
        return admin_pb2.UpdateResponse()

    @handle_errors
    async def Unpublish(
        self, request: admin_pb2.UnpublishRequest, context: grpc.aio.ServicerContext
    ):
        await self._state.unpublish(request.model_id)
        self._manager.kick()
        await self._manager.notify_watchers()
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
        self._state.get(model_id)
        if not self._manager.ready_addresses(model_id) and self._manager.grace_remaining() > 0:
            # Just restarted: servers are rejoining. An empty set now would make clients drop
            # replicas that still serve, so wait for them (or for the grace period to end).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._manager.wait_changed(
                        lambda: bool(self._manager.ready_addresses(model_id))
                    ),
                    timeout=self._manager.grace_remaining(),
                )
        last: frozenset[str] | None = None
        while True:
            if model_id not in self._state.models():
                yield admin_pb2.WatchLocResponse(admin_id=self._admin_id)
                raise NotFoundError(f"model {model_id} was unpublished")
            current = self._manager.ready_addresses(model_id)
            if current != last:
                last = current
                yield admin_pb2.WatchLocResponse(admin_id=self._admin_id, addresses=sorted(current))
            await self._manager.wait_changed(
                lambda seen=last: (
                    model_id not in self._state.models()
                    or self._manager.ready_addresses(model_id) != seen
                )
            )

    @handle_errors
    async def WaitForReady(
        self, request: admin_pb2.WaitForReadyRequest, context: grpc.aio.ServicerContext
    ):
        model_id = request.model_id
        if request.num_replicas < 0:
            raise InvalidArgumentError(f"num_replicas must be >= 0, got {request.num_replicas}")
        self._state.get(model_id)
        await self._manager.wait_changed(
            lambda: (
                model_id not in self._state.models()
                or len(self._manager.ready_addresses(model_id)) >= request.num_replicas
            )
        )
        self._state.get(model_id)  # NOT_FOUND if it was unpublished meanwhile
        return admin_pb2.WaitForReadyResponse()

    @handle_errors
    async def Join(self, request: admin_pb2.JoinRequest, context: grpc.aio.ServicerContext):
        if not request.address:
            raise InvalidArgumentError("join needs the server's address")
        await self._manager.join(request)
        return admin_pb2.JoinResponse(admin_id=self._admin_id)
