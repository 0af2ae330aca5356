"""The request id rule, the error body's `request_id`, and log lines carrying the id (no server)."""

from __future__ import annotations

import io
import json
import logging

import grpc
from hypothesis import given
from hypothesis import strategies as st

from service import logs, request_context
from service.api.json_body import ERROR_BODY_METADATA, failure
from service.errors import InvalidRequest, Problem
from service.request_context import MAX_REQUEST_ID_CHARS, RequestContext, request_id_from, valid_request_id


def test_valid_ids_are_kept_and_others_replaced():
    for kept in ("a", "0b4f-uuid-like", "run42:item7.retry_1", "x" * MAX_REQUEST_ID_CHARS):
        assert request_id_from([("x-request-id", kept)]) == kept
    for odd in ("", "-x", ".x", "x" * (MAX_REQUEST_ID_CHARS + 1), "a b", "a\nb", "ä", "a/b", "<script>"):
        made = request_id_from([("x-request-id", odd)])
        assert made != odd and valid_request_id(made)
    assert valid_request_id(request_id_from([]))
    assert request_id_from([]) != request_id_from([])  # fresh each time


@given(st.text(max_size=200))
def test_whatever_a_caller_sends_the_id_used_is_valid_and_bounded(value):
    used = request_id_from([("x-request-id", value)])
    assert valid_request_id(used) and len(used) <= MAX_REQUEST_ID_CHARS
    assert used == value or not valid_request_id(value)


def test_failures_carry_the_id_in_trailers_and_the_json_body():
    error = InvalidRequest.of(Problem("items[0].sequence", 0, "invalid character '1' at position 3"))
    code, _, trailers = failure(error, "EncodeJson", gateway=True, request_id="req-1")
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    metadata = dict(trailers)
    assert metadata["x-request-id"] == "req-1"
    body = json.loads(metadata[ERROR_BODY_METADATA])
    assert body["request_id"] == "req-1" and body["errors"][0]["field"] == "items[0].sequence"
    assert {"detail", "errors", "status_code", "code", "message"} <= set(body)


def test_log_lines_carry_the_request_being_handled():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RequestFields())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test_request_context")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
        token = request_context.CURRENT.set(RequestContext("req-2", "Encode", "esm2-8m", trace_id="ab" * 16))
        try:
            logger.warning("inside %s", "a request")
        finally:
            request_context.CURRENT.reset(token)
    finally:
        logger.removeHandler(handler)
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert outside["request_id"] == "-" and "trace_id" not in outside
    assert inside["request_id"] == "req-2" and inside["trace_id"] == "ab" * 16
    assert inside["message"] == "inside a request" and inside["level"] == "WARNING"
