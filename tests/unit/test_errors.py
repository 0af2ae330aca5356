"""One place maps errors to gRPC statuses: each error's own code, retry-after only where retrying helps."""

import grpc

from service import errors


def test_each_error_carries_its_status():
    cases = {
        errors.InvalidRequest("items[0].sequence: must not be empty"): grpc.StatusCode.INVALID_ARGUMENT,
        errors.NotFound("model 'x' is not served here"): grpc.StatusCode.NOT_FOUND,
        errors.FailedPrecondition("no contact regression"): grpc.StatusCode.FAILED_PRECONDITION,
        errors.QueueFull("server busy"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.OutOfMemory("does not fit"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.DeadlineExceeded("deadline passed while queued"): grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.Internal("model failure; see the server log"): grpc.StatusCode.INTERNAL,
    }
    for error, code in cases.items():
        assert errors.status(error, "Encode")[:2] == (code, str(error))


def test_retry_after_only_where_a_retry_can_succeed():
    """A full queue drains, and a lost worker's work succeeds on another replica (or this one
    once restarted): both say retry-after 1. Everything else fails the same way again."""
    retry_after = {
        errors.QueueFull("busy"): (("retry-after", "1"),),
        errors.WorkerLost("model worker lost"): (("retry-after", "1"),),
        errors.OutOfMemory("does not fit"): (),
        errors.InvalidRequest("items[0].sequence: must not be empty"): (),
        errors.NotFound("model 'x' is not served here"): (),
        errors.FailedPrecondition("no contact regression"): (),
        errors.DeadlineExceeded("deadline passed while queued"): (),
        errors.Unauthenticated("invalid API key"): (),
        errors.Internal("model failure; see the server log"): (),
    }
    for error, trailers in retry_after.items():
        assert errors.status(error, "Encode")[2] == trailers, type(error).__name__


def test_an_unexpected_exception_is_internal_and_hides_its_details():
    code, message, trailers = errors.status(KeyError("secret internals"), "EncodeStream")
    assert code is grpc.StatusCode.INTERNAL and trailers == ()
    assert message == "internal error in EncodeStream; see the server log"
