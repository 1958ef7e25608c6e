"""Fixtures for model server tests: an event loop in a thread, in-process servers on
127.0.0.1:0 and sync gRPC stubs to them (the way clients call)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from model_server.config import ModelServerConfig
from model_server.server import ModelServer
from sax.v1 import lm_pb2_grpc, modelet_pb2, modelet_pb2_grpc

T = TypeVar("T")

TINY_KEY = "/sax/test/tiny"


class LoopThread:
    """An asyncio loop running in a background thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def wait_for(predicate: Callable[[], T], timeout: float = 10, what: str = "condition") -> T:
    """Polls predicate until it returns a truthy value; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def poll() -> Callable[..., Any]:
    """`wait_for(predicate, timeout=10, what=...)`, for tests."""
    return wait_for


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def start_server(loop_thread: LoopThread) -> Iterator[Callable[..., ModelServer]]:
    """Factory: start_server(builder=..., store=..., **config fields) -> started ModelServer on
    127.0.0.1:0; every server is stopped at the end of the module."""
    started: list[ModelServer] = []

    def start(**kwargs: Any) -> ModelServer:
        extra = {k: kwargs.pop(k) for k in ("builder", "store") if k in kwargs}
        config = ModelServerConfig(host="127.0.0.1", port=0, **kwargs)
        server = ModelServer(config, **extra)
        loop_thread.run(server.start())
        started.append(server)
        return server

    yield start
    for server in started:
        loop_thread.run(server.stop(0))


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ModelServer]) -> ModelServer:
    """A model server without a cell (cpu, topology 1)."""
    return start_server()


@pytest.fixture(scope="module")
def channel(server: ModelServer) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def modelet(channel: grpc.Channel) -> modelet_pb2_grpc.ModeletStub:
    return modelet_pb2_grpc.ModeletStub(channel)


@pytest.fixture(scope="module")
def lm(channel: grpc.Channel) -> lm_pb2_grpc.LMServiceStub:
    return lm_pb2_grpc.LMServiceStub(channel)


@pytest.fixture(scope="module")
def tiny(modelet: modelet_pb2_grpc.ModeletStub) -> str:
    """Key of a test.TinyLM loaded on `server`."""
    modelet.Load(
        modelet_pb2.LoadRequest(
            model_key=TINY_KEY, model_path="test.TinyLM", checkpoint_path="None"
        ),
        timeout=30,
    )
    return TINY_KEY
