"""Joined model servers as the admin observes them: membership, status polls, load and unload.

Owns one gRPC channel per server. Knows nothing of placement; the manager decides what to call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc

from sax.errors import SaxError, UnavailableError, from_rpc_error
from sax.v1 import admin_pb2, common_pb2, modelet_pb2, modelet_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaInfo:
    """One model on one server, from its last status poll."""

    status: int  # common_pb2.ModelStatus
    failure_reason: str = ""
    model_path: str = ""
    checkpoint_path: str = ""
    overrides: tuple[tuple[str, str], ...] = ()
    method_names: tuple[str, ...] = ()


@dataclass
class JoinedServer:
    """A model server that joined the cell."""

    address: str
    server_id: str
    spec: admin_pb2.ModelServer
    channel: grpc.aio.Channel
    stub: modelet_pb2_grpc.ModeletStub
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_wall_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    # model_key -> replica info, as of the last successful poll.
    models: dict[str, ReplicaInfo] = field(default_factory=dict)
    polled: bool = False
    # Set when a poll finds a new server id; the manager forgets the server's past failures.
    restarted: bool = False

    def to_proto(self, memory_used: int) -> admin_pb2.JoinedModelServer:
        """The server as shown in cell stats."""
        return admin_pb2.JoinedModelServer(
            model_server=self.spec,
            address=self.address,
            last_seen_ms=self.last_seen_wall_ms,
            loaded_models={k: v.status for k, v in self.models.items()},
            failure_reasons={
                k: v.failure_reason for k, v in self.models.items() if v.failure_reason
            },
            server_id=self.server_id,
            memory_used_bytes=memory_used,
        )


class ServerPool:
    """The set of joined servers, keyed by address."""

    def __init__(self, poll_timeout_s: float, dead_after_s: float) -> None:
        self._poll_timeout_s = poll_timeout_s
        self._dead_after_s = dead_after_s
        self._servers: dict[str, JoinedServer] = {}
        # Fencing number of this admin's lease, sent with every control call (0: none).
        self.fencing_token = 0

    def servers(self) -> dict[str, JoinedServer]:
        """Live servers by address (a snapshot)."""
        return dict(self._servers)

    def get(self, address: str) -> JoinedServer | None:
        return self._servers.get(address)

    async def join(self, request: admin_pb2.JoinRequest) -> tuple[JoinedServer, bool]:
        """Registers or refreshes a server; returns it and whether it is new or restarted (a
        restarted server has lost what it had loaded)."""
        old = self._servers.get(request.address)
        now_ms = int(time.time() * 1000)
        if old is not None:
            old.spec = request.model_server
            old.last_seen = time.monotonic()
            old.last_seen_wall_ms = now_ms
            if old.server_id == request.server_id:
                return old, False
            logger.info("server %s restarted (new id %s)", request.address, request.server_id)
            old.server_id = request.server_id
            old.models = {}
            old.polled = False
            return old, True
        channel = grpc.aio.insecure_channel(request.address)
        server = JoinedServer(
            address=request.address,
            server_id=request.server_id,
            spec=request.model_server,
            channel=channel,
            stub=modelet_pb2_grpc.ModeletStub(channel),
        )
        self._servers[request.address] = server
        logger.info(
            "server %s joined (%s/%s, %d configs, %.1f GiB)",
            request.address,
            request.model_server.chip_type,
            request.model_server.chip_topology,
            len(request.model_server.servable_model_paths),
            request.model_server.memory_bytes / (1 << 30),
        )
        return server, True

    async def poll(self, server: JoinedServer) -> bool:
        """Refreshes one server's model statuses; True on success."""
        try:
            resp = await server.stub.GetStatus(
                modelet_pb2.GetStatusRequest(
                    include_failure_reasons=True, fencing_token=self.fencing_token
                ),
                timeout=self._poll_timeout_s,
            )
        except (grpc.RpcError, grpc.aio.UsageError) as e:
            logger.debug("status poll of %s failed: %s", server.address, e)
            return False
        if resp.server_id and resp.server_id != server.server_id:
            # Restarted under the same address: what it had is gone; it will join again.
            logger.info("server %s restarted; forgetting its models", server.address)
            server.server_id = resp.server_id
            server.restarted = True
        server.models = {
            m.model_key: ReplicaInfo(
                status=m.model_status,
                failure_reason=m.failure_reason,
                model_path=m.model_path,
                checkpoint_path=m.checkpoint_path,
                overrides=tuple(sorted(m.overrides.items())),
                method_names=tuple(m.method_names),
            )
            for m in resp.models
        }
        server.last_seen = time.monotonic()
        server.last_seen_wall_ms = int(time.time() * 1000)
        server.polled = True
        return True

    def remove(self, address: str, server_id: str) -> JoinedServer | None:
        """Removes a draining server (if it is the one of that id) and returns it; the caller
        closes its channel as for a dead one."""
        server = self._servers.get(address)
        if server is None or (server_id and server.server_id != server_id):
            return None
        del self._servers[address]
        logger.info("server %s left: it is draining", address)
        return server

    def drop_dead(self) -> list[JoinedServer]:
        """Removes servers not seen for dead_after_s and returns them; the caller stops what is
        in flight on them and then closes their channels."""
        now = time.monotonic()
        dead = [s for s in self._servers.values() if now - s.last_seen > self._dead_after_s]
        for server in dead:
            del self._servers[server.address]
            logger.warning(
                "server %s dropped: no answer for %.1f s", server.address, now - server.last_seen
            )
        return dead

    async def load(
        self, server: JoinedServer, model: admin_pb2.Model, timeout_s: float
    ) -> SaxError | None:
        """Tells a server to load a model; returns the error, if any."""
        request = modelet_pb2.LoadRequest(
            model_key=model.model_id,
            model_path=model.model_path,
            checkpoint_path=model.checkpoint_path,
            acls=model.acls,
            overrides=dict(model.overrides),
            fencing_token=self.fencing_token,
        )
        server.models[model.model_id] = ReplicaInfo(status=common_pb2.LOADING)
        try:
            await server.stub.Load(request, timeout=timeout_s)
        except grpc.RpcError as e:
            return from_rpc_error(e)
        except grpc.aio.UsageError as e:
            return UnavailableError(f"server {server.address} was dropped: {e}")
        return None

    async def unload(self, server: JoinedServer, model_id: str) -> SaxError | None:
        """Tells a server to unload a model; returns the error, if any."""
        try:
            await server.stub.Unload(
                modelet_pb2.UnloadRequest(model_key=model_id, fencing_token=self.fencing_token),
                timeout=self._poll_timeout_s * 5,
            )
        except grpc.RpcError as e:
            return from_rpc_error(e)
        except grpc.aio.UsageError as e:
            return UnavailableError(f"server {server.address} was dropped: {e}")
        return None

    async def close(self) -> None:
        for server in self._servers.values():
            await server.channel.close()
        self._servers.clear()
