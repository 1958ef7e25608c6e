"""`python -m sax.health_probe`: the images' HEALTHCHECK, against real servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sax import health_probe


@pytest.fixture
def grpc_health() -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC server with only the health service; returns its address and servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/health" else 503
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    """An HTTP server answering 200 on /health and 503 elsewhere; returns its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_grpc_serving_and_not_serving(grpc_health: tuple[str, health.HealthServicer]) -> None:
    address, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("sax.Modelet", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert health_probe.check(address) == (True, f"{address}: SERVING")
    assert health_probe.check(address, service="sax.Modelet") == (
        False,
        f"{address}: NOT_SERVING",
    )
    ok, reason = health_probe.check(address, service="sax.Unknown")
    assert not ok and "NOT_FOUND" in reason


def test_grpc_unreachable() -> None:
    ok, reason = health_probe.check("127.0.0.1:1", timeout=2)
    assert not ok and "UNAVAILABLE" in reason


def test_http(http_server: str) -> None:
    assert health_probe.check(f"{http_server}/health") == (True, f"{http_server}/health: HTTP 200")
    assert health_probe.check(f"{http_server}/other") == (False, f"{http_server}/other: HTTP 503")


def test_command_exit_status(
    grpc_health: tuple[str, health.HealthServicer], http_server: str
) -> None:
    address, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    run = [sys.executable, "-m", "sax.health_probe"]
    ok = subprocess.run([*run, address], capture_output=True, text=True, timeout=30)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"healthy: {address}: SERVING")
    servicer.enter_graceful_shutdown()
    down = subprocess.run([*run, address], capture_output=True, text=True, timeout=30)
    assert (down.returncode, down.stdout.strip()) == (1, f"unhealthy: {address}: NOT_SERVING")
    assert health_probe.main([f"{http_server}/health"]) == 0
    assert health_probe.main([f"{http_server}/down", "--timeout=2"]) == 1
