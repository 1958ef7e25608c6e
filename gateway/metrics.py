"""Prometheus metrics of the gateway, served at /metrics.

- `sax_gateway_requests_total{route, method, status}`: answered requests; `route` is the route's
  path template ("/v1/chat/completions"), "unmatched" for unknown paths.
- `sax_gateway_request_duration_seconds{route, method}`: time to the response headers (a
  stream's first update).
- `sax_gateway_calls_in_flight`: Generate and GenerateStream calls running on the cell.
Each app has its own registry, so several apps can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = CONTENT_TYPE_LATEST
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """The gateway's collectors in their own registry."""

    def __init__(self, in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sax_gateway_requests",
            "HTTP requests answered, by route, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "sax_gateway_request_duration_seconds",
            "Seconds from a request to its response headers, by route and method.",
            ("route", "method"),
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.calls_in_flight = Gauge(
            "sax_gateway_calls_in_flight",
            "Generate and GenerateStream calls running on the cell.",
            registry=self.registry,
        )
        self.calls_in_flight.set_function(in_flight)

    def exposition(self) -> bytes:
        """The text exposition format of every collector."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware that counts and times every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    @staticmethod
    def _route(scope: Scope) -> str:
        # The router records the matched route in the scope (FastAPI's APIRoute sets "route").
        route = scope.get("route")
        path = getattr(route, "path_format", None) or getattr(route, "path", None)
        return str(path) if path else "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        timed = False
        method = str(scope.get("method", ""))

        async def send_wrapper(message: Message) -> None:
            nonlocal status, timed
            if message["type"] == "http.response.start" and not timed:
                status = int(message["status"])
                timed = True
                self.metrics.latency.labels(self._route(scope), method).observe(
                    time.perf_counter() - start
                )
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = self._route(scope)
            if not timed:
                self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, method, str(status)).inc()
