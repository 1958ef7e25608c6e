"""One place that turns errors into HTTP answers.

`sax.errors` classes map to HTTP statuses by their gRPC code, following google.rpc's mapping:
INVALID_ARGUMENT, FAILED_PRECONDITION and OUT_OF_RANGE 400 (a failed precondition, such as a
platform that cannot host a config, is a request the caller must change, not a conflict to retry),
NOT_FOUND 404, ALREADY_EXISTS 409, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504,
PERMISSION_DENIED 403, UNAUTHENTICATED 401, CANCELLED 499, UNIMPLEMENTED 501, anything else 500.

Bodies: routes under /v1/ answer in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`; the SAX-HTTP routes answer `{"detail": "..."}`
like the ai-on-gke server. Request validation errors (bad JSON, a missing or mistyped field) are
400, never 422 or 500.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sax.errors import SaxError

logger = logging.getLogger(__name__)

_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# OpenAI error "type" per HTTP status.
_OPENAI_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def http_status(err: SaxError) -> int:
    """The HTTP status of a sax error (500 for INTERNAL, UNKNOWN and unmapped codes)."""
    return _STATUS.get(err.code, 500)


def is_openai_path(path: str) -> bool:
    """Whether the route answers errors in OpenAI's shape."""
    return path == "/v1" or path.startswith("/v1/")


def openai_error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """`{"error": {...}}` as the OpenAI API returns it."""
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    request: Request, status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    """The JSON error answer for the request's route family."""
    if is_openai_path(request.url.path):
        return JSONResponse(openai_error_body(status, message, code, param), status_code=status)
    return JSONResponse({"detail": message}, status_code=status)


def sax_error_response(request: Request, err: SaxError) -> JSONResponse:
    """The answer to a sax error raised while serving the request."""
    status = http_status(err)
    if status >= 500:
        logger.warning("%s %s: %s (%s)", request.method, request.url.path, err, err.code.name)
    message = str(err) or err.code.name
    param = getattr(err, "param", None)
    return error_response(request, status, message, err.code.name.lower(), param)


def _location(loc: tuple[Any, ...]) -> str:
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    return ".".join(str(p) for p in loc)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for pydantic's errors, and the first offending field."""
    lines = []
    param = None
    for error in exc.errors():
        where = _location(tuple(error.get("loc", ())))
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            lines.append(f"the request body is not valid JSON ({ctx.get('error', 'bad JSON')})")
            continue
        if param is None and where:
            param = where
        msg = str(error.get("msg", "invalid value"))
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Registers the handlers that give every error its status and JSON body."""

    @app.exception_handler(SaxError)
    async def _sax(request: Request, exc: SaxError) -> JSONResponse:
        return sax_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(request, 400, message, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(request, exc.status_code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this answer; the server logs its traceback.
        return error_response(
            request, 500, f"internal error ({type(exc).__name__}); the gateway logged the details"
        )
