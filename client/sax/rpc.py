"""The one place where server-side exceptions become gRPC status codes.

`handle_errors` wraps a grpc.aio servicer method (unary or server-streaming): a `SaxError` aborts
the call with its code and message; any other exception is logged once and becomes INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from sax.errors import SaxError

logger = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    if isinstance(exc, SaxError):
        await context.abort(exc.code, str(exc))
    logger.exception("internal error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {exc!r}")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for `async def Method(self, request, context)` or async-generator methods."""
    method = fn.__qualname__

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
            try:
                async for item in fn(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - the boundary
                await _abort(context, method, e)

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # noqa: BLE001 - the boundary
            await _abort(context, method, e)

    return unary_wrapper
