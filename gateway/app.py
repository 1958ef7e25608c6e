"""The gateway's FastAPI application: `create_app(settings)`.

Routes: the SAX-HTTP ones (`gateway.sax_http`), the OpenAI-compatible ones
(`gateway.openai_api`), and
- `GET /health`: 200 {"status": "ok"} when the cell's admin answers within `health_timeout`,
  503 {"status": "unavailable", "detail"} otherwise; with `?model=<name>`, 200 only when the
  model has a LOADED replica (`sax.WaitForReady` within `health_timeout`), 404 if it is not
  published, 503 if it is not ready or the admin does not answer.
- `GET /metrics`: Prometheus text exposition (`gateway.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import sax
from gateway import openai_api, sax_http
from gateway.app_state import GatewayState
from gateway.config import GatewaySettings
from gateway.http_errors import install_error_handlers
from gateway.metrics import CONTENT_TYPE, MetricsMiddleware
from sax.errors import InvalidArgumentError, NotFoundError, SaxError

logger = logging.getLogger(__name__)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app for `settings`. A non-empty `settings.sax_root` becomes the process's
    sax_root (`sax.SetSaxRoot`); otherwise $SAX_ROOT is used."""
    settings = settings or GatewaySettings()
    if settings.sax_root:
        sax.SetSaxRoot(settings.sax_root)
    state = GatewayState.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "gateway for cell %s (call timeout %gs, %d concurrent calls)",
            settings.sax_cell,
            settings.timeout,
            settings.max_concurrent_calls,
        )
        yield
        state.runner.shutdown()

    app = FastAPI(
        title="sax gateway",
        description="SAX-HTTP and OpenAI-compatible endpoints in front of a sax cell.",
        lifespan=lifespan,
    )
    app.state.gateway = state
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.include_router(sax_http.router())
    app.include_router(openai_api.router())

    @app.get("/health", response_model=None)
    async def health(request: Request, model: str | None = None) -> dict[str, Any] | JSONResponse:
        timeout = settings.health_timeout
        try:
            if model:
                model_id = state.catalog.resolve_name(model)
                await state.runner.admin(sax.WaitForReady, model_id, 1, timeout=timeout)
                return {"status": "ok", "model": model_id}
            await state.runner.admin(sax.ListAll, settings.sax_cell, timeout=timeout)
        except (NotFoundError, InvalidArgumentError):
            if model:
                raise
            return _unavailable(f"cell {settings.sax_cell} does not exist under the sax_root")
        except SaxError as e:
            return _unavailable(str(e))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    return app


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "detail": detail}, status_code=503)
