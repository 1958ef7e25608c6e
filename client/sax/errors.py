"""One exception hierarchy for the whole project, each class carrying its gRPC status code.

Components raise these; each server translates them to gRPC status codes at one boundary
(`admin_server`/`model_server` use `sax.rpc.handle_errors`), and the client maps `grpc.RpcError`
back to the same classes with `from_rpc_error`.
"""

from __future__ import annotations

import grpc


class SaxError(Exception):
    """Base class. `code` is the gRPC status code the error travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(SaxError):
    """Malformed request, bad value, unknown override key, prompt too long."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SaxError):
    """Model not published, not loaded here, unknown config name."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(SaxError):
    """Publish of an existing id, create of an existing cell."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(SaxError):
    """Checkpoint incomplete, platform cannot host the config, no admin has ever run."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(SaxError):
    """Queue or cache full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(SaxError):
    """Draining, shutting down, no admin yet, no replica ready."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(SaxError):
    """The caller's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(SaxError):
    """The caller cancelled the call."""

    code = grpc.StatusCode.CANCELLED


class PermissionDeniedError(SaxError):
    """An ACL refuses the caller."""

    code = grpc.StatusCode.PERMISSION_DENIED


class InternalError(SaxError):
    """A bug or an unexpected failure; the server logged the details."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[SaxError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        PermissionDeniedError,
        InternalError,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> SaxError:
    """Builds the SaxError subclass for a gRPC status code."""
    cls = _BY_CODE.get(code, SaxError)
    err = cls(message)
    if cls is SaxError:
        err.code = code
    return err


def from_rpc_error(err: grpc.RpcError) -> SaxError:
    """Maps a `grpc.RpcError` raised by a stub call to the matching SaxError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for_code(code, details or str(code))
