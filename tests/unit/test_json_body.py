"""The JSON API's body reader and error bodies, in-process (service/api/json_body.py)."""

from __future__ import annotations

import gzip
import json

import pytest

from esm2_wire.vocabulary import Limits
from service.errors import BadBody, InvalidRequest, Problem
from service.api.json_body import BodyParser, error_body, inflate

PARSER = BodyParser(Limits(8, 2048), max_bytes=1 << 20)


def test_reads_a_valid_body():
    body = PARSER.parse(b'{"params": {"include": ["mean"], "repr_layers": [-1, 0]}, "items": [{"sequence": "MKT"}]}',
                        "", "encode")
    assert (body.sequences, body.include, body.repr_layers) == (["MKT"], ["mean"], [-1, 0])


def test_inflates_gzip_and_stops_at_the_cap():
    assert inflate(gzip.compress(b"x" * 100), "gzip", 100) == b"x" * 100
    with pytest.raises(BadBody) as caught:
        inflate(gzip.compress(b"x" * 101), "gzip", 100)
    assert caught.value.http_status == 413
    with pytest.raises(BadBody) as caught:
        inflate(b"x", "br", 100)
    assert caught.value.http_status == 415


@pytest.mark.parametrize("data, fragment", [
    (b'{"items": [], "items": []}', "duplicate key"),
    (b'{"items": [{"sequence": "A"}], "params": {"repr_layers": [Infinity]}}', "Infinity"),
    (b'{"items": [{"sequence": "A"}], "extra": {"' + b"k" * 5000 + b'": 1}}', "unknown field"),
])
def test_refuses_what_the_schema_or_json_forbids(data, fragment):
    with pytest.raises(InvalidRequest) as caught:
        PARSER.parse(data, "", "encode")
    assert fragment in str(caught.value) and len(str(caught.value)) < 300


def test_error_body_names_items_and_fields_and_stays_small():
    problems = (Problem("items[3].sequence", 3, "bad; allowed: A"), Problem("params.include[0]", None, "no"))
    body = json.loads(error_body(400, "INVALID_ARGUMENT", "items[3].sequence: bad; allowed: A; params.include[0]: no",
                                 problems))
    assert body["errors"] == [{"index": 3, "field": "items[3].sequence", "detail": "bad; allowed: A"},
                              {"index": None, "field": "params.include[0]", "detail": "no"}]
    assert body["detail"] == body["message"] and body["status_code"] == 400
    huge = json.loads(error_body(400, "INVALID_ARGUMENT", "items: " + "x" * 100_000))
    assert len(huge["detail"]) <= 2048 and huge["detail"].endswith("...")


@pytest.mark.parametrize("data, fragment", [
    (json.dumps({"items": [{"sequence": "A"}] * 20_000}).encode(), "items: expected 1 to 8 items, got 20000"),
    (json.dumps({"items": [{"sequence": "A"}], "params": {"include": ["mean"] * 50_000}}).encode(),
     "params.include: at most 64 values"),
])
def test_long_lists_are_refused_before_validation(data, fragment):
    with pytest.raises(InvalidRequest) as caught:
        PARSER.parse(data, "", "encode")
    assert fragment in str(caught.value)
