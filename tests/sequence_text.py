"""Arbitrary sequence text for property tests, and an independent tokenizer to judge answers."""

from __future__ import annotations

from hypothesis import strategies as st

from esm2_wire.vocabulary import ENCODE_LETTERS, MASK, PREDICT_LETTERS

PIECES = st.sampled_from([*"ACDEFGHIKLMNPQRSTVWYBXZUO-", MASK, "<mas", "k>", "<", "a", " ", "\n", "\u00e9", "\u0000",
                          "\U0001f600", "<pad>", "<cls>"])
TEXT = st.lists(PIECES | st.characters(), max_size=24).map("".join)


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
