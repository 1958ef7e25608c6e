"""Gateways served by uvicorn from threads of the test process, on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.app_state import GatewayState
from gateway.config import GatewaySettings
from tests.integration.cluster import Cluster

SMOLLM2 = "/sax/test/smollm2"
TINY = "/sax/test/tiny"
#: A second cell whose admin is started and killed: "admin down".
DOWN_CELL = "/sax/down"


@dataclass
class RunningGateway:
    """A gateway app served by uvicorn in a thread."""

    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    @property
    def state(self) -> GatewayState:
        return self.app.state.gateway

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(settings: GatewaySettings) -> RunningGateway:
    """Starts `create_app(settings)` on a free port of 127.0.0.1 and waits until it serves."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.02)
    return RunningGateway(app, server, thread, f"http://127.0.0.1:{port}")


@dataclass
class GatewayCell:
    """The cell and its gateways: `main` with default limits; `strict` with one call slot,
    2 s calls, 1 s admin calls and /sax/down (whose admin is dead) as its cell."""

    cluster: Cluster
    main: RunningGateway
    strict: RunningGateway
