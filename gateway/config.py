"""Settings of the HTTP gateway (`python -m gateway` flags, `create_app(settings)`)."""

from __future__ import annotations

from dataclasses import dataclass

from sax.errors import InvalidArgumentError
from sax.naming import parse_cell

#: The port of the ai-on-gke SAX-HTTP server and of the tutorial.
DEFAULT_PORT = 8888


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway reaches the cell and how it bounds the work it takes on."""

    # Address and port to listen on (0: a free port, logged at start).
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # sax_root (a folder or gs://bucket/prefix); "" uses $SAX_ROOT.
    sax_root: str = ""
    # Cell of /v1/models, of /health and of OpenAI model names without a cell ("smollm2" is
    # "<sax_cell>/smollm2").
    sax_cell: str = "/sax/test"
    # Deadline of one Generate or GenerateStream call on the cell, seconds.
    timeout: float = 60.0
    # Deadline of one admin call (publish, list, model lookups), seconds.
    admin_timeout: float = 10.0
    # Deadline of the admin checks behind /health, seconds.
    health_timeout: float = 2.0
    # Generate calls in flight at once (an OpenAI request with n=3 makes 3); past it, 429.
    max_concurrent_calls: int = 256
    # Seconds a model's record (config, checkpoint, chat template) is reused before it is
    # asked of the admin again; a stale record is used while the admin does not answer.
    model_cache_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        parse_cell(self.sax_cell)
        for name in ("timeout", "admin_timeout", "health_timeout"):
            if getattr(self, name) <= 0:
                raise InvalidArgumentError(f"{name} must be > 0 seconds")
        if self.max_concurrent_calls < 1:
            raise InvalidArgumentError("max_concurrent_calls must be >= 1")
        if self.model_cache_ttl_s < 0:
            raise InvalidArgumentError("model_cache_ttl_s must be >= 0")
        if not 0 <= self.port < 65536:
            raise InvalidArgumentError(f"port must be in [0, 65535], got {self.port}")
