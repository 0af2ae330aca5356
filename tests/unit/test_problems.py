"""Validation problems travel as (field, index, message) from the validators to both answers:
the gRPC message joins them as before, and the JSON gateway's `errors` list takes them as they
were found, never re-read from the joined text. `failure` is the one mapping both the
handlers and the request guard answer with (service/api/json_body.py)."""

from __future__ import annotations

import json

import grpc
import pytest

from esm2_wire.vocabulary import Limits
from service.api.json_body import (ERROR_BODY_METADATA, HTTP_STATUS_METADATA, MAX_ERRORS, BodyParser, error_body,
                                   failure)
from service.api.validation import parse_items, parse_options
from service.errors import MAX_MESSAGE_CHARS, BadBody, FailedPrecondition, InvalidRequest, Problem, QueueFull

LIMITS = Limits(max_items=40, max_sequence_length=8)
ENCODE_ALLOWED = "allowed: ACDEFGHIKLMNPQRSTVWY, BXZUO and '-'"


def _refusal(call) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as refused:
        call()
    return refused.value


def _gateway_body(exc: Exception, method: str = "EncodeJson") -> tuple[grpc.StatusCode, str, dict, dict]:
    code, message, trailers = failure(exc, method, gateway=True)
    metadata = dict(trailers)
    return code, message, metadata, json.loads(metadata[ERROR_BODY_METADATA])


def test_the_grpc_message_joins_problems_as_before():
    exc = _refusal(lambda: parse_items(["M1", "MK", ""], predict=False, limits=LIMITS))
    expected = (f"items[0].sequence: invalid character '1' at position 2; {ENCODE_ALLOWED}; "
                "items[2].sequence: must not be empty")
    assert str(exc) == expected
    assert exc.problems == (Problem("items[0].sequence", 0, f"invalid character '1' at position 2; {ENCODE_ALLOWED}"),
                            Problem("items[2].sequence", 2, "must not be empty"))
    assert failure(exc, "Encode", gateway=False) == (grpc.StatusCode.INVALID_ARGUMENT, expected, ())
    code, message, metadata, body = _gateway_body(exc)
    assert (code, message, metadata[HTTP_STATUS_METADATA]) == (grpc.StatusCode.INVALID_ARGUMENT, expected, "400")
    assert body == {"detail": expected, "message": expected, "status_code": 400, "code": "INVALID_ARGUMENT",
                    "errors": [{"index": 0, "field": "items[0].sequence",
                                "detail": f"invalid character '1' at position 2; {ENCODE_ALLOWED}"},
                               {"index": 2, "field": "items[2].sequence", "detail": "must not be empty"}]}


def test_an_echoed_value_that_looks_like_another_problem_stays_one_problem():
    # The caller's value holds "; items[9].sequence: " (echoed, as every message names it). Splitting
    # the joined message at "; items[" made this a second problem of an item 9 the caller never sent.
    exc = _refusal(lambda: parse_options(["a; items[9].sequence: boom"], [], num_layers=6, model="m"))
    assert str(exc).startswith("params.include[0]: unknown value 'a; items[9].sequence: boom'; allowed: mean")
    _, _, _, body = _gateway_body(exc)
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(None, "params.include[0]")]
    assert body["errors"][0]["detail"].startswith("unknown value 'a; items[9].sequence: boom'; allowed: mean")


@pytest.mark.parametrize("problem", [
    Problem("items[4].sequence", 4, "invalid character ':' at position 3; allowed: A: C; items[1]: D"),
    Problem("params.include; items[1].sequence", None, "a field name holding the separator"),
    Problem("items[7]", 7, "missing required field 'sequence'"),
])
def test_field_index_and_message_reach_the_json_errors_list_unchanged(problem):
    exc = InvalidRequest.of(problem, Problem("items[0].sequence", 0, "must not be empty"))
    code, message, _, body = _gateway_body(exc)
    assert message == f"{problem.field}: {problem.message}; items[0].sequence: must not be empty"
    assert body["errors"] == [{"index": problem.index, "field": problem.field, "detail": problem.message},
                              {"index": 0, "field": "items[0].sequence", "detail": "must not be empty"}]


def test_json_body_problems_carry_their_item():
    parser = BodyParser(LIMITS, max_bytes=1 << 20)
    data = b'{"items": [{"sequence": "A"}, {"sequence": 5}, {}], "params": {"include": ["x"]}}'
    exc = _refusal(lambda: parser.parse(data, "", "encode"))
    assert [(p.field, p.index) for p in exc.problems] == [
        ("items[1].sequence", 1), ("items[2]", 2), ("params.include[0]", None)]
    assert str(exc) == "; ".join(f"{p.field}: {p.message}" for p in exc.problems)
    _, _, _, body = _gateway_body(exc)
    assert [(e["index"], e["field"], e["detail"]) for e in body["errors"]] == [
        (p.index, p.field, p.message) for p in exc.problems]


def test_problems_of_the_whole_body_or_the_model_are_told_in_detail_only():
    parser = BodyParser(LIMITS, max_bytes=1 << 20)
    exc = _refusal(lambda: parser.parse(b'{"items": [{"sequence": 1}], "model": "m"}', "", "encode"))
    assert [p.field for p in exc.problems] == ["body", "items[0].sequence"]
    _, message, _, body = _gateway_body(exc)
    assert message.startswith("body: unknown field 'model' (the model comes from the URL path)")
    assert [e["field"] for e in body["errors"]] == ["items[0].sequence"]
    no_head = FailedPrecondition.of(Problem("model", None, "model m has no masked-LM head"))
    code, message, metadata, body = _gateway_body(no_head, "PredictJson")
    assert (code, message, metadata[HTTP_STATUS_METADATA]) == (
        grpc.StatusCode.FAILED_PRECONDITION, "model: model m has no masked-LM head", "400")
    assert body["errors"] == []


def test_many_problems_keep_the_message_bounded_and_list_the_first_ones():
    exc = _refusal(lambda: parse_items(["1" * 8] * 40, predict=False, limits=LIMITS))
    assert len(exc.problems) == 40
    code, message, _, body = _gateway_body(exc)
    assert len(message) == MAX_MESSAGE_CHARS and message.endswith(f"(message cut at {MAX_MESSAGE_CHARS} characters)")
    assert [e["index"] for e in body["errors"]] == list(range(MAX_ERRORS))
    assert body["detail"] == message


def test_other_failures_map_once_for_both_answers():
    code, message, metadata, body = _gateway_body(KeyError("secret"))
    assert (code, message, metadata[HTTP_STATUS_METADATA]) == (
        grpc.StatusCode.INTERNAL, "internal error in EncodeJson; see the server log", "500")
    assert body["errors"] == [] and "secret" not in json.dumps(body)
    code, _, metadata, body = _gateway_body(BadBody(413, "too big"))
    assert (code, metadata[HTTP_STATUS_METADATA], body["status_code"]) == (grpc.StatusCode.INVALID_ARGUMENT, "413", 413)
    code, _, metadata, _ = _gateway_body(QueueFull("busy"))
    assert (code, metadata["retry-after"], metadata[HTTP_STATUS_METADATA]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "1", "429")
    assert failure(QueueFull("busy"), "Encode", gateway=False) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after", "1"),))


def test_error_bodies_stay_ascii_and_small():
    problem = Problem("items[0].sequence", 0, "caf\u00e9 " + "x" * 5000)
    text = error_body(400, "INVALID_ARGUMENT", str(problem), (problem,)).decode()
    assert text.isascii()
    entry = json.loads(text)["errors"][0]
    assert len(entry["detail"]) == 512 and entry["detail"].endswith("...")
