"""Every error the service reports, each carrying its gRPC status (and retry-after);
`status` maps any exception to what the caller sees, in this one place.

Envoy's transcoder turns the codes into HTTP statuses (INVALID_ARGUMENT 400, NOT_FOUND 404,
FAILED_PRECONDITION 400, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504)
and the `retry-after` trailer into the Retry-After header.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A failure to report to the caller as `code` with this message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retry_after_s: int | None = None  # set: the caller may retry after this many seconds


class InvalidRequest(ServiceError, ValueError):
    """Input the caller must fix (HTTP 400); the message names the field, item and problem."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """An unknown model or action."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    """Valid, but this server cannot do it (e.g. contacts without regression weights)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(ServiceError):
    """Too much work waiting: the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s = 1


class OutOfMemory(ServiceError):
    """One sequence does not fit in device memory; retrying fails the same way."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    """A bug or a model failure; the message says where to look, never the internals."""

    code = grpc.StatusCode.INTERNAL


def status(exc: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, message, trailing metadata) for an exception raised while serving `method`."""
    if isinstance(exc, ServiceError):
        trailers = () if exc.retry_after_s is None else (("retry-after", str(exc.retry_after_s)),)
        return exc.code, str(exc), trailers
    return grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log", ()
