"""Property tests of request parsing and validation (issue 9, section 6), in-process and
against a real server.

For any text: either accepted with the token count an independent tokenizer finds, or
refused with a message naming the item and, for a bad character, its position and the
character. Never another exception; every message bounded and ASCII.
"""

from __future__ import annotations

import re

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.proto import pb

from service.validation import (
    ENCODE_LETTERS, MASK, MAX_MESSAGE_CHARS, PREDICT_LETTERS, InvalidRequest, Limits, ParsedItem, parse_items,
    parse_options, parse_sequence,
)

LIMITS = Limits(max_items=4, max_sequence_length=12)  # small, so that lengths cross the limit often
PIECES = st.sampled_from([*"ACDEFGHIKLMNPQRSTVWYBXZUO-", MASK, "<mas", "k>", "<", "a", " ", "\n", "\u00e9", "\u0000",
                          "\U0001f600", "<pad>", "<cls>"])
TEXT = st.lists(PIECES | st.characters(), max_size=24).map("".join)
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def oracle_tokens(text: str, predict: bool) -> tuple[list[str], int | None]:
    """Tokens (`<mask>` as one in predict) and the offset of the first character not allowed."""
    tokens, bad, position = [], None, 0
    allowed = PREDICT_LETTERS if predict else ENCODE_LETTERS
    while position < len(text):
        if predict and text.startswith(MASK, position):
            tokens.append(MASK)
            position += len(MASK)
            continue
        if text[position] not in allowed and bad is None:
            bad = position
        tokens.append(text[position])
        position += 1
    return tokens, bad


def check_one(text: str, predict: bool, index: int = 0) -> None:
    result = parse_sequence(index, text, predict=predict, limits=LIMITS)
    tokens, bad = oracle_tokens(text, predict)
    if isinstance(result, ParsedItem):
        assert bad is None and 0 < len(tokens) <= LIMITS.max_sequence_length
        assert list(result.tokens) == tokens
        assert not predict or MASK in tokens
        return
    assert isinstance(result, str)
    assert result.startswith(f"items[{index}].sequence: ")
    assert result.isascii() and len(result) <= MAX_MESSAGE_CHARS
    if not text:
        assert result.endswith("must not be empty")
    elif len(tokens) > LIMITS.max_sequence_length:  # lengths are checked first
        assert f": {len(tokens)} residues; at most {LIMITS.max_sequence_length} are allowed" in result
    elif not predict and MASK in text:
        assert result.endswith("<mask> is only accepted by predict")
    elif bad is not None:
        assert f"at position {bad};" in result, (text, result)
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
@given(st.lists(st.text(max_size=80) | st.sampled_from(["mean", "logits", "per_residue"]), max_size=5),
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
    assert options.include <= {"mean", "per_token", "bos", "contacts", "logits", "attentions"}


def test_huge_values_are_cut_in_messages():
    try:
        parse_options(["x" * 1_000_000] * 1000, [10**18] * 1000, num_layers=6, model="esm2-8m")
    except InvalidRequest as exc:
        message = str(exc)
    assert len(message) <= MAX_MESSAGE_CHARS and message.endswith(f"(message cut at {MAX_MESSAGE_CHARS} characters)")
    assert "'xxxxxxxx" in message and "... (1000000 characters)" in message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TEXT, min_size=1, max_size=3), st.booleans())
def test_real_server_answers_tokens_or_invalid_argument(server, texts, predict):
    """The server's limits are larger (2,048), so only characters and masks decide here."""
    stub = server.stub
    items = [pb.SequenceItem(sequence=t) for t in texts]
    try:
        if predict:
            results = stub.Predict(pb.PredictRequest(model="esm2-tiny", items=items), timeout=60).results
            counts = [len(r.sequence_tokens) for r in results]
        else:
            request = pb.EncodeRequest(model="esm2-tiny", items=items, params=pb.EncodeParams(include=["logits"]))
            counts = [r.logits.rows for r in stub.Encode(request, timeout=60).results]
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        limits = Limits(max_items=8, max_sequence_length=2048)
        refused = [i for i, t in enumerate(texts)
                   if not isinstance(parse_sequence(i, t, predict=predict, limits=limits), ParsedItem)]
        assert refused and all(f"items[{i}].sequence: " in exc.details() for i in refused)
        return
    assert counts == [len(oracle_tokens(t, predict)[0]) for t in texts]
