"""Score's variants (issue 32): their bounds hold before any of them is parsed, and one strict
grammar (ASCII capitals and digits, `:` between mutations) is read by the server, the client,
the CLI and the published schema alike."""

from __future__ import annotations

import json
import re
import string

import pytest
from hypothesis import example, given, settings, strategies as st

import service.api.scoring as scoring
from esm2_wire import variants
from esm2_wire.variants import VARIANT_PATTERN, parse_variant
from esm2_wire.vocabulary import Limits
from service.api import json_body
from service.api.json_body import BodyParser
from service.api.scoring import ScoreLimits, parse_score_items
from service.errors import InvalidRequest

AMINO = "ACDEFGHIKLMNPQRSTVWY"
WILD_TYPE = (AMINO * 103)[:2048]
# The hostile request of issue 32: 280 variants of 2,048 mutations each, a 3.7 MB JSON body.
ALL_POSITIONS = ":".join(f"{a}{p}{'A' if a != 'A' else 'C'}" for p, a in enumerate(WILD_TYPE, start=1))
HOSTILE = [ALL_POSITIONS] * 280


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """Every variant the server parses, in order (the real parser, counted)."""
    seen: list[str] = []

    def counted(text, sequence):
        seen.append(text)
        return parse_variant(text, sequence)

    monkeypatch.setattr(scoring, "parse_variant", counted)
    return seen


def test_too_many_mutations_are_refused_before_any_variant_is_parsed(parses):
    with pytest.raises(InvalidRequest) as caught:
        parse_score_items([WILD_TYPE], [HOSTILE], Limits(8, 2048), ScoreLimits())
    assert str(caught.value) == ("items: 573440 mutations in one request; at most 10000 are allowed "
                                 "(--max-score-mutations): split the variants over several requests")
    assert parses == []


def test_the_json_body_is_refused_before_any_variant_is_parsed_or_validated(parses, monkeypatch):
    body = json.dumps({"params": {"method": "wt_marginal"},
                       "items": [{"sequence": WILD_TYPE, "variants": HOSTILE}]}).encode()
    assert len(body) > 3_700_000
    parser = BodyParser(Limits(8, 2048), max_bytes=4 << 20)
    matched = []  # the schema validator's pattern checks: it must not visit the variants either
    real_search = re.search
    monkeypatch.setattr(re, "search", lambda *a, **k: matched.append(a[1]) or real_search(*a, **k))
    decoded = []  # nor is the JSON parsed: its ':' are counted in the raw bytes
    real_loads = json_body.json.loads
    monkeypatch.setattr(json_body.json, "loads", lambda *a, **k: decoded.append(1) or real_loads(*a, **k))
    with pytest.raises(InvalidRequest) as caught:
        parser.parse(body, "", "score")
    assert str(caught.value) == ("items: the body holds 573165 ':', more than a request within --max-score-mutations "
                                 "(10000 mutations) can hold (10019: one after each key, one between two mutations): "
                                 "split the variants over several requests")
    assert parses == [] and matched == [] and decoded == []


def test_under_the_colon_bound_the_mutations_are_counted_before_any_is_parsed(parses):
    """10,001 single mutations hold no ':' inside a variant: the count of variants refuses them."""
    body = json.dumps({"items": [{"sequence": "MKTAY", "variants": ["K2A"] * 10_001}]}).encode()
    with pytest.raises(InvalidRequest) as caught:
        BodyParser(Limits(8, 2048), max_bytes=4 << 20).parse(body, "", "score")
    assert "10001 mutations in one request; at most 10000 are allowed" in str(caught.value)
    assert parses == []


def test_a_variant_longer_than_its_mutations_allow_is_refused_unparsed(parses):
    long_one = "K2" + "0" * 100_000 + "A"  # one mutation by its colons, 100,003 characters
    with pytest.raises(InvalidRequest) as caught:
        parse_score_items(["MKTAY"], [["K2A", long_one]], Limits(8, 2048), ScoreLimits())
    (problem,) = caught.value.problems
    assert problem.field == "items[0].variants[1]" and problem.index == 0
    assert "100003 characters for 1 mutations; a variant of 1 is at most 11" in problem.message
    assert parses == []


def test_within_the_bounds_each_variant_is_parsed_once():
    items = parse_score_items([WILD_TYPE], [[ALL_POSITIONS[:60_000].rsplit(":", 1)[0]]], Limits(8, 2048),
                              ScoreLimits())
    assert len(items[0].variants[0]) == ALL_POSITIONS[:60_000].count(":")


def test_a_repeated_position_is_named_at_the_end_of_a_long_variant():
    repeated = ALL_POSITIONS + ":" + ALL_POSITIONS.split(":")[1000]
    with pytest.raises(ValueError, match="position 1001 is mutated twice"):
        parse_variant(repeated, WILD_TYPE + "A")


# ---- one strict grammar ----------------------------------------------------------------------
OUTSIDE = ["K\u0662A", "K\uff12A", "K\u09e8A", " K2A", "K2A ", "K2A : T3G", "K2A\t:T3G", "K2A\n", "k2a",
           "K2A:", ":K2A", "K2A::T3G", "", "K+2A", "K2\u00c5",
           # a grammatical first mutation that is wrong for the wild type does not hide the grammar
           "A2A:", "K9A:", "A0A: T3G"]


@pytest.mark.parametrize("text", OUTSIDE)
def test_text_outside_the_grammar_is_refused_by_parser_and_schema(text):
    with pytest.raises(ValueError, match="is not a mutation like A23G"):
        parse_variant(text, "MKTAY")
    assert re.fullmatch(VARIANT_PATTERN.strip("^$"), text) is None


@settings(max_examples=300, deadline=None)
@example("A1A:")
@example("A0A:")  # once found by this test: the wild type was checked before the grammar
@given(st.text(alphabet=string.ascii_letters + string.digits + ": \t\u0662\uff12", max_size=24))
def test_the_schema_pattern_and_the_parser_accept_the_same_texts(text):
    """The published pattern (read as ECMA-262 reads it: `$` only at the very end) and the parser
    agree on the grammar; the parser may still refuse a grammatical variant for its wild type."""
    sequence = "M" + "K" * 200
    grammatical = re.fullmatch(VARIANT_PATTERN.strip("^$"), text) is not None
    try:
        parse_variant(text, sequence)
    except ValueError as exc:
        assert grammatical != ("is not a mutation like A23G" in str(exc))
    else:
        assert grammatical


def test_the_bounds_are_on_the_shared_module():
    assert variants.mutations_in("K2A:T3G:Y5W") == 3
    assert variants.oversized("K123456789A") is None and variants.oversized("K1234567890A") is not None


def test_more_mutations_than_positions_is_named_as_a_repeat_not_a_grammar_error():
    with pytest.raises(ValueError, match="position 1 is mutated twice"):
        parse_variant("M1A:K2A:T3A:A4G:Y5A:M1G", "MKTAY")
    with pytest.raises(ValueError, match="position 6 is outside the sequence"):
        parse_variant("M1A:K2A:T3A:A4G:Y5A:K6G:T7A", "MKTAY")
