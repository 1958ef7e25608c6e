"""Fake Admin and LMService servers on 127.0.0.1 for the client and saxutil tests.

The fakes are small real gRPC servers (sync grpc, thread pool) so the client is tested over
real channels: a sax_root under tmp_path holds the cell /sax/test and the fake admin's location
record.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

import sax
from sax.cell import create_cell, write_location
from sax.naming import CellName
from sax.storage.local import LocalStore
from sax.v1 import admin_pb2, admin_pb2_grpc, lm_pb2, lm_pb2_grpc

CELL = "/sax/test"
KNOWN_CONFIGS = ("test.TinyLM", "llama.SmolLM2_135M")


def start_server(add: Callable[[grpc.Server], None]) -> tuple[grpc.Server, str]:
    """Starts a sync gRPC server on 127.0.0.1:0; returns it and its "ip:port"."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """An in-memory Admin: published models, LOADED addresses set by the test, WatchLoc."""

    def __init__(self, admin_id: str = "admin-1") -> None:
        self.admin_id = admin_id
        self.cond = threading.Condition()
        self.models: dict[str, admin_pb2.Model] = {}
        self.addresses: dict[str, list[str]] = {}
        self.replicas: dict[str, list[admin_pb2.ReplicaStatus]] = {}
        self.calls: list[str] = []
        # method name -> status codes to answer with, one per call, before answering normally.
        self.failures: dict[str, list[grpc.StatusCode]] = {}
        self.watch_sent = 0
        self.watchers = 0

    # Test helpers.

    def add_model(self, model_id: str, path: str = "test.TinyLM", replicas: int = 1) -> None:
        with self.cond:
            self.models[model_id] = admin_pb2.Model(
                model_id=model_id,
                model_path=path,
                checkpoint_path="None",
                requested_num_replicas=replicas,
                version=1,
            )
            self.cond.notify_all()

    def set_addresses(self, model_id: str, addresses: list[str]) -> None:
        with self.cond:
            self.addresses[model_id] = list(addresses)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "condition not reached in time"

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self.cond:
            self.calls.append(method)
            pending = self.failures.get(method)
            code = pending.pop(0) if pending else None
        if code is not None:
            context.abort(code, f"injected {code.name}")

    # Admin RPCs.

    def Publish(
        self, request: admin_pb2.PublishRequest, context: grpc.ServicerContext
    ) -> admin_pb2.PublishResponse:
        self._enter("Publish", context)
        m = request.model
        if m.requested_num_replicas < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "replicas must be >= 0")
        if m.model_path not in KNOWN_CONFIGS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown config {m.model_path}")
        with self.cond:
            if m.model_id in self.models:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{m.model_id} is published")
            model = admin_pb2.Model()
            model.CopyFrom(m)
            model.version = 1
            self.models[m.model_id] = model
            self.cond.notify_all()
        return admin_pb2.PublishResponse()

    def Update(
        self, request: admin_pb2.UpdateRequest, context: grpc.ServicerContext
    ) -> admin_pb2.UpdateResponse:
        self._enter("Update", context)
        m = request.model
        with self.cond:
            old = self.models.get(m.model_id)
            if old is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"{m.model_id} is not published")
            if old.model_path != m.model_path:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model_path cannot change")
            model = admin_pb2.Model()
            model.CopyFrom(m)
            model.version = old.version + 1
            self.models[m.model_id] = model
        return admin_pb2.UpdateResponse()

    def Unpublish(
        self, request: admin_pb2.UnpublishRequest, context: grpc.ServicerContext
    ) -> admin_pb2.UnpublishResponse:
        self._enter("Unpublish", context)
        with self.cond:
            if self.models.pop(request.model_id, None) is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"{request.model_id} is not published")
            self.addresses.pop(request.model_id, None)
            self.cond.notify_all()
        return admin_pb2.UnpublishResponse()

    def _published(self, model_id: str) -> admin_pb2.PublishedModel:
        return admin_pb2.PublishedModel(
            model=self.models[model_id],
            modelet_addresses=self.addresses.get(model_id, []),
            replicas=self.replicas.get(model_id, []),
        )

    def List(
        self, request: admin_pb2.ListRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListResponse:
        self._enter("List", context)
        with self.cond:
            if request.model_id:
                if request.model_id not in self.models:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"{request.model_id} not published")
                return admin_pb2.ListResponse(published_models=[self._published(request.model_id)])
            ids = sorted(self.models)
            return admin_pb2.ListResponse(published_models=[self._published(i) for i in ids])

    def Stats(
        self, request: admin_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.StatsResponse:
        self._enter("Stats", context)
        stat = admin_pb2.ModelServerTypeStat(chip_type="cpu", chip_topology="1", num_replicas=2)
        return admin_pb2.StatsResponse(model_server_type_stats=[stat], admin_id=self.admin_id)

    def WaitForReady(
        self, request: admin_pb2.WaitForReadyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.WaitForReadyResponse:
        self._enter("WaitForReady", context)
        with self.cond:
            while len(self.addresses.get(request.model_id, [])) < request.num_replicas:
                if not context.is_active():
                    return admin_pb2.WaitForReadyResponse()
                self.cond.wait(0.02)
        return admin_pb2.WaitForReadyResponse()

    def WatchLoc(
        self, request: admin_pb2.WatchLocRequest, context: grpc.ServicerContext
    ) -> Iterator[admin_pb2.WatchLocResponse]:
        self._enter("WatchLoc", context)
        sent: list[str] | None = None
        with self.cond:
            self.watchers += 1
        try:
            while context.is_active():
                with self.cond:
                    if request.model_id not in self.models:
                        context.abort(grpc.StatusCode.NOT_FOUND, f"{request.model_id} not found")
                    current = list(self.addresses.get(request.model_id, []))
                    if current == sent:
                        self.cond.wait(0.02)
                        continue
                yield admin_pb2.WatchLocResponse(admin_id=self.admin_id, addresses=current)
                sent = current
                with self.cond:
                    self.watch_sent += 1
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.watchers -= 1
                self.cond.notify_all()


class FakeLM(lm_pb2_grpc.LMServiceServicer):
    """A model server: answers with its name so tests see which replica served a call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.calls = 0
        self.requests: list[object] = []
        # Codes to answer with, one per call, before answering normally; `always` for every call.
        self.failures: list[grpc.StatusCode] = []
        self.always: grpc.StatusCode | None = None
        # GenerateStream: the responses to send, and a code to end with after them (or None).
        self.stream: list[lm_pb2.GenerateStreamResponse] = []
        self.stream_error: grpc.StatusCode | None = None

    def _enter(self, request: object, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls += 1
            self.requests.append(request)
            code = self.failures.pop(0) if self.failures else self.always
        if code is not None:
            context.abort(code, f"{self.name}: injected {code.name}")

    def Generate(
        self, request: lm_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> lm_pb2.GenerateResponse:
        self._enter(request, context)
        return lm_pb2.GenerateResponse(
            texts=[
                lm_pb2.DecodedText(text=f"{self.name}:{request.text}", score=-1.5),
                lm_pb2.DecodedText(text=f"{self.name}:alt", score=-0.5),
            ]
        )

    def GenerateStream(
        self, request: lm_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[lm_pb2.GenerateStreamResponse]:
        self._enter(request, context)
        yield from self.stream
        if self.stream_error is not None:
            context.abort(self.stream_error, f"{self.name}: stream broke")

    def Score(
        self, request: lm_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> lm_pb2.ScoreResponse:
        self._enter(request, context)
        return lm_pb2.ScoreResponse(logp=[-float(len(s)) for s in request.suffix])


@dataclass
class AdminHandle:
    """A running fake admin, with its address."""

    fake: FakeAdmin
    server: grpc.Server
    address: str

    def stop(self) -> None:
        self.server.stop(0).wait()


@dataclass
class Cluster:
    """A sax_root with cell /sax/test, and helpers to start fake admins and model servers."""

    root: str
    store: LocalStore
    servers: list[grpc.Server] = field(default_factory=list)

    def new_admin(self, admin_id: str) -> FakeAdmin:
        """A fake admin servicer, not started (pass it to start_admin)."""
        return FakeAdmin(admin_id)

    def start_admin(self, admin_id: str = "admin-1", fake: FakeAdmin | None = None) -> AdminHandle:
        """Starts a fake admin and writes its address to the cell's location record."""
        fake = fake or FakeAdmin(admin_id)
        server, address = start_server(
            lambda s: admin_pb2_grpc.add_AdminServicer_to_server(fake, s)
        )
        self.servers.append(server)
        write_location(self.store, CellName("test"), address, fake.admin_id)
        return AdminHandle(fake, server, address)

    def start_lm(self, name: str) -> tuple[FakeLM, grpc.Server, str]:
        """Starts a fake model server; returns the servicer, server and address."""
        fake = FakeLM(name)
        server, address = start_server(
            lambda s: lm_pb2_grpc.add_LMServiceServicer_to_server(fake, s)
        )
        self.servers.append(server)
        return fake, server, address


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator[Cluster]:
    """A fresh sax_root (set with sax.SetSaxRoot) holding the cell /sax/test."""
    root = tmp_path / "sax-root"
    store = LocalStore(root)
    create_cell(store, CellName("test"))
    sax.SetSaxRoot(str(root))
    c = Cluster(str(root), store)
    yield c
    sax.SetSaxRoot(None)
    for server in c.servers:
        server.stop(0).wait()


@pytest.fixture
def admin(cluster: Cluster) -> AdminHandle:
    """A fake admin for /sax/test, found through the location record."""
    return cluster.start_admin()
