"""The Modelet service: the admin's control calls (Load, Unload, GetStatus) -> ModelManager.

ACLs and fencing tokens in the requests are accepted and not enforced yet.
"""

from __future__ import annotations

import grpc

from model_server.model_manager import ModelManager
from sax.rpc import handle_errors
from sax.v1 import modelet_pb2, modelet_pb2_grpc


class ModeletServicer(modelet_pb2_grpc.ModeletServicer):
    """Thin adapter from the Modelet protos to a `ModelManager`."""

    def __init__(self, manager: ModelManager, server_id: str) -> None:
        self._manager = manager
        self._server_id = server_id

    @handle_errors
    async def Load(
        self, request: modelet_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> modelet_pb2.LoadResponse:
        await self._manager.load(
            request.model_key, request.model_path, request.checkpoint_path, dict(request.overrides)
        )
        return modelet_pb2.LoadResponse()

    @handle_errors
    async def Unload(
        self, request: modelet_pb2.UnloadRequest, context: grpc.aio.ServicerContext
    ) -> modelet_pb2.UnloadResponse:
        await self._manager.unload(request.model_key)
        return modelet_pb2.UnloadResponse()

    @handle_errors
    async def GetStatus(
        self, request: modelet_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> modelet_pb2.GetStatusResponse:
        models = [
            modelet_pb2.ModelWithStatus(
                model_key=m.model_key,
                model_status=m.status,  # type: ignore[arg-type]
                failure_reason=m.failure_reason if request.include_failure_reasons else "",
                model_path=m.model_path,
                checkpoint_path=m.checkpoint_path,
                method_names=m.method_names,
                overrides=m.overrides,
            )
            for m in self._manager.statuses()
        ]
        return modelet_pb2.GetStatusResponse(
            models=models,
            server_id=self._server_id,
            total_loads=self._manager.total_loads,
            total_unloads=self._manager.total_unloads,
        )
