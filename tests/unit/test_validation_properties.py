"""Property tests of request parsing and validation (issue 9, section 6), in-process
(the same property against a real server is in tests/test_hostile_grpc.py).

For any text: either accepted with the token count an independent tokenizer finds, or
refused with a message naming the item and, for a bad character, its position and the
character. Never another exception; every message bounded and ASCII.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sequence_text import TEXT, oracle_tokens

from esm2_wire.output_kinds import OutputKind
from esm2_wire.vocabulary import MASK, Limits
from service.errors import MAX_MESSAGE_CHARS, InvalidRequest, Problem
from service.api.validation import ParsedItem, parse_items, parse_options, parse_sequence

LIMITS = Limits(max_items=4, max_sequence_length=12)  # small, so that lengths cross the limit often
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_one(text: str, predict: bool, index: int = 0) -> None:
    result = parse_sequence(index, text, predict=predict, limits=LIMITS)
    tokens, bad = oracle_tokens(text, predict)
    if isinstance(result, ParsedItem):
        assert bad is None and 0 < len(tokens) <= LIMITS.max_sequence_length
        assert list(result.tokens) == tokens
        assert not predict or MASK in tokens
        return
    assert isinstance(result, Problem) and (result.field, result.index) == (f"items[{index}].sequence", index)
    result = str(result)  # as the gRPC message carries it
    assert result.startswith(f"items[{index}].sequence: ")
    assert result.isascii() and len(result) <= MAX_MESSAGE_CHARS
    if not text:
        assert result.endswith("must not be empty")
    elif len(tokens) > LIMITS.max_sequence_length:  # lengths are checked first
        assert f": {len(tokens)} residues; at most {LIMITS.max_sequence_length} are allowed" in result
    elif not predict and MASK in text:
        assert result.endswith("<mask> is only accepted by predict")
    elif bad is not None:
        assert f"at position {bad + 1};" in result, (text, result)  # 1-based, as people count
        assert ascii(text[bad]) in result
    else:
        assert predict and MASK not in text and result.endswith("must contain at least one <mask> token")


@PROPERTY
@given(TEXT)
def test_encode_sequence(text):
    check_one(text, predict=False)


@PROPERTY
@given(TEXT)
def test_predict_sequence(text):
    check_one(text, predict=True)


@PROPERTY
@given(st.lists(TEXT, max_size=6), st.booleans())
def test_items_all_problems_or_all_tokens(texts, predict):
    try:
        parsed = parse_items(texts, predict=predict, limits=LIMITS)
    except InvalidRequest as exc:
        message = str(exc)
        assert message.isascii() and len(message) <= MAX_MESSAGE_CHARS
        if not 1 <= len(texts) <= LIMITS.max_items:
            assert message == f"items: expected 1 to {LIMITS.max_items} items, got {len(texts)}"
            return
        refused = [i for i, t in enumerate(texts)
                   if not isinstance(parse_sequence(i, t, predict=predict, limits=LIMITS), ParsedItem)]
        assert refused and all(f"items[{i}].sequence" in message for i in refused)
        return
    assert [list(p.tokens) for p in parsed] == [oracle_tokens(t, predict)[0] for t in texts]


@PROPERTY
@given(st.lists(st.text(max_size=80) | st.sampled_from(["mean", "logits", "per_residue", "attentions"]), max_size=5),
       st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=5))
def test_options(include, layers):
    try:
        options = parse_options(include, layers, num_layers=6, model="esm2-8m")
    except InvalidRequest as exc:
        message = str(exc)
        assert message.isascii() and len(message) <= MAX_MESSAGE_CHARS
        assert re.search(r"params\.(include|repr_layers)\[\d+\]", message)
        return
    assert all(-7 <= layer <= 6 for layer in layers)
    assert all(0 <= layer <= 6 for layer in options.layers)
    assert options.outputs == {OutputKind.parse(name) for name in include or ["mean"]}


def test_huge_values_are_cut_in_messages():
    try:
        parse_options(["x" * 1_000_000] * 64, [10**18] * 64, num_layers=6, model="esm2-8m")
    except InvalidRequest as exc:
        message = str(exc)
    assert len(message) <= MAX_MESSAGE_CHARS and message.endswith(f"(message cut at {MAX_MESSAGE_CHARS} characters)")
    assert "'xxxxxxxx" in message and "... (1000000 characters)" in message
