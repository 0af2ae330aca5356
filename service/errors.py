"""Every error the service reports, each carrying its gRPC status (and retry-after);
`status` maps any exception to what the caller sees, in this one place.

Envoy's transcoder turns the codes into HTTP statuses (INVALID_ARGUMENT 400, NOT_FOUND 404,
FAILED_PRECONDITION 400, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504)
and the `retry-after` trailer into the Retry-After header.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from esm2_wire.proto import MODEL_HEADER

# Messages travel in the grpc-message trailer (and Envoy's JSON body); clients and Envoy
# refuse trailers over 8-16 KiB and then fail the whole connection, so every value echoed
# from a request is cut (echo), and so is every whole message (status).
MAX_ECHO_CHARS = 40
MAX_MESSAGE_CHARS = 2048
ELLIPSIS = "..."


def echo(value: str) -> str:
    """A caller's value for a message: ASCII-escaped like repr(); past MAX_ECHO_CHARS, cut with its length.

    ascii() keeps messages 7-bit, so percent-encoding in the trailer cannot multiply their size.
    """
    text = ascii(value[:MAX_ECHO_CHARS])  # cut first: escaping a megabyte to keep 40 characters is waste
    if len(text) <= MAX_ECHO_CHARS and len(value) <= MAX_ECHO_CHARS:
        return text
    return text[: MAX_ECHO_CHARS - len(ELLIPSIS)] + ELLIPSIS + f" ({len(value)} characters)"


def bounded_message(message: str) -> str:
    """The whole message cut at MAX_MESSAGE_CHARS, saying that it was cut."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    tail = f"{ELLIPSIS} (message cut at {MAX_MESSAGE_CHARS} characters)"
    return message[: MAX_MESSAGE_CHARS - len(tail)] + tail


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: the field it is in (`items[2].sequence`, `params.include[0]`),
    the item it concerns (None for the request's params or the item list as a whole), and what is
    wrong. It travels as it is to the JSON gateway's `errors` list; only the gRPC message joins
    problems into text."""

    field: str
    index: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def join_problems(problems: Iterable[Problem]) -> str:
    """Several problems in one message, `field: problem; field: problem`, within MAX_MESSAGE_CHARS."""
    return bounded_message("; ".join(map(str, problems)))


class ServiceError(Exception):
    """A failure to report to the caller as `code` with this message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retry_after_s: int | None = None  # set: the caller may retry after this many seconds
    http_status: int | None = None  # set: the JSON gateway answers this instead of the code's status
    problems: tuple[Problem, ...] = ()  # set: the message is these problems, joined

    @classmethod
    def of(cls, *problems: Problem) -> ServiceError:
        """This error, reporting `problems` (at least one) each with its field and item."""
        error = cls(join_problems(problems))
        error.problems = problems
        return error


class InvalidRequest(ServiceError, ValueError):
    """Input the caller must fix (HTTP 400); the message names the field, item and problem."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BadBody(InvalidRequest):
    """A JSON request body that cannot be read: too large once inflated (413), an
    unsupported encoding (415), a corrupt gzip stream or invalid JSON (400)."""

    def __init__(self, http_status: int, message: str):
        super().__init__(message)
        self.http_status = http_status


class NotFound(ServiceError):
    """An unknown model or action."""

    code = grpc.StatusCode.NOT_FOUND


class UnknownModel(NotFound):
    """A model this server does not serve. The message names this server's own models and,
    behind a gateway with several pools (`fleet`: the others' models, from FLEET_MODELS_HEADER),
    theirs apart, with how a call reaches them: a gRPC call that omits MODEL_HEADER lands on the
    default pool, and must not be told that the model it asked for is served here."""

    def __init__(self, name: str, served, fleet=()):
        self.name, self.served = name, sorted(set(served))
        self.fleet = sorted(set(fleet) - set(self.served))
        if not self.fleet:
            message = f"model {echo(name)} is not served here; served models: {', '.join(self.served)}"
        else:
            message = (f"model {echo(name)} is not served here; this server serves {', '.join(self.served)}, "
                       f"the gateway's other pools {', '.join(self.fleet)}: a gRPC call reaches a model's pool "
                       f"with the {MODEL_HEADER} header set to its name, a JSON call by the model in its path")
        super().__init__(message)

    def behind_gateway(self, fleet) -> "UnknownModel":
        """The same error, naming the models of the gateway's other pools apart from this server's."""
        return UnknownModel(self.name, self.served, fleet)


class FailedPrecondition(ServiceError):
    """Valid, but this server cannot do it (e.g. contacts without regression weights)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(ServiceError):
    """Too much work waiting: the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s = 1


class CannotFinish(ServiceError):
    """The request's own estimated model time is past its caller's deadline, whatever else is queued:
    refused at once (the message names the estimate and the deadline) instead of accepted to time out.
    DEADLINE_EXCEEDED is what the caller would have got, only later; unlike RESOURCE_EXHAUSTED no retry
    policy (Envoy's retry_on, gRPC clients') retries it, since a retry fails the same way. The JSON gateway
    answers 400, not 504: nothing timed out, the request must change."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 400


class BehindQueue(QueueFull):
    """The work queued ahead of the request would make it miss its deadline: RESOURCE_EXHAUSTED
    (HTTP 429) with retry-after set to when it may fit."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SlowReader(ServiceError):
    """A caller stopped reading its stream while the server held too much of its response
    (service.api.response_memory); the message says what a slow consumer should do."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ResponseBudgetFull(ServiceError):
    """Responses in flight already take the server's budget for them: retry after a moment."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s = 1


class OutOfMemory(ServiceError):
    """One sequence does not fit in device memory; retrying fails the same way."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    """A missing or wrong API key (HTTP 401)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class WorkerLost(ServiceError):
    """The model worker died or its device is unusable: this server stops; retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE
    retry_after_s = 1


class Internal(ServiceError):
    """A bug or a model failure; the message says where to look, never the internals."""

    code = grpc.StatusCode.INTERNAL


def status(exc: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, message, trailing metadata) for an exception raised while serving `method`."""
    if isinstance(exc, ServiceError):
        trailers = () if exc.retry_after_s is None else (("retry-after", str(exc.retry_after_s)),)
        return exc.code, bounded_message(str(exc)), trailers
    return grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log", ()


# What Envoy's transcoder answers for each gRPC status (Grpc::Utility::grpcToHttpStatus).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(exc: Exception | None, code: grpc.StatusCode) -> int:
    """The HTTP status the JSON gateway answers for this failure."""
    override = getattr(exc, "http_status", None) if isinstance(exc, ServiceError) else None
    return override or _HTTP_STATUS.get(code, 500)
