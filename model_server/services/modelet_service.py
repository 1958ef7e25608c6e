"""The Modelet service: the admin's control calls (Load, Unload, GetStatus) -> ModelManager.

Fencing: every control call from an admin carries the fencing number of the admin's lease on
the cell. The servicer remembers the highest number seen (in Load, Unload and GetStatus) and
refuses a Load or Unload carrying a lower one with FAILED_PRECONDITION, so an admin that lost its
lease (and may not know it yet) can no longer change what is loaded. 0 means "no fencing" (a
caller outside any cell, e.g. a test driving the server directly) and is always accepted.
ACLs in the requests are accepted and not enforced yet.
"""

from __future__ import annotations

import logging

import grpc

from model_server.model_manager import ModelManager
from sax.errors import FailedPreconditionError
from sax.rpc import handle_errors
from sax.v1 import modelet_pb2, modelet_pb2_grpc

logger = logging.getLogger(__name__)


class ModeletServicer(modelet_pb2_grpc.ModeletServicer):
    """Thin adapter from the Modelet protos to a `ModelManager`."""

    def __init__(self, manager: ModelManager, server_id: str) -> None:
        self._manager = manager
        self._server_id = server_id
        # Highest fencing number seen in any control call (0: none yet).
        self.fencing_token = 0

    def _fence(self, token: int, action: str, model_key: str) -> None:
        """Raises FAILED_PRECONDITION for a token below the highest seen; remembers a higher."""
        if token == 0:
            return
        if token < self.fencing_token:
            logger.warning(
                "refused %s of %s: fenced: token %d < %d",
                action,
                model_key,
                token,
                self.fencing_token,
            )
            raise FailedPreconditionError(
                f"fenced: token {token} < {self.fencing_token}; this {action} of {model_key} "
                "comes from an admin that lost the cell's lease"
            )
        if token > self.fencing_token:
            logger.info("fencing token is now %d", token)
            self.fencing_token = token

    @handle_errors
    async def Load(
        self, request: modelet_pb2.LoadRequest, context: grpc.aio.ServicerContext
    ) -> modelet_pb2.LoadResponse:
        self._fence(request.fencing_token, "load", request.model_key)
        await self._manager.load(
            request.model_key, request.model_path, request.checkpoint_path, dict(request.overrides)
        )
        return modelet_pb2.LoadResponse()

    @handle_errors
    async def Unload(
        self, request: modelet_pb2.UnloadRequest, context: grpc.aio.ServicerContext
    ) -> modelet_pb2.UnloadResponse:
        self._fence(request.fencing_token, "unload", request.model_key)
        await self._manager.unload(request.model_key)
        return modelet_pb2.UnloadResponse()

    @handle_errors
    async def GetStatus(
        self, request: modelet_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> modelet_pb2.GetStatusResponse:
        if request.fencing_token > self.fencing_token:
            logger.info("fencing token is now %d", request.fencing_token)
            self.fencing_token = request.fencing_token
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
