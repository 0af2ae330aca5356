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


def test_only_a_full_queue_asks_for_a_retry():
    assert errors.status(errors.QueueFull("busy"), "Encode")[2] == (("retry-after", "1"),)
    assert errors.status(errors.OutOfMemory("does not fit"), "Encode")[2] == ()


def test_an_unexpected_exception_is_internal_and_hides_its_details():
    code, message, trailers = errors.status(KeyError("secret internals"), "EncodeStream")
    assert code is grpc.StatusCode.INTERNAL and trailers == ()
    assert message == "internal error in EncodeStream; see the server log"
