"""The letters a sequence may hold, and the request limits a server enforces by default."""

from __future__ import annotations

from dataclasses import dataclass

# The 20 standard amino acids: predict logits are reported over these, in alphabet order.
STANDARD_AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWY")
ENCODE_LETTERS = STANDARD_AMINO_ACIDS | frozenset("BXZUO-")
PREDICT_LETTERS = ENCODE_LETTERS - {"-"}
MASK = "<mask>"


@dataclass(frozen=True)
class Limits:
    """Per-request bounds (a server's are in ListModels' ModelInfo)."""

    max_items: int = 8
    max_sequence_length: int = 2048
    max_windowed_residues: int = 0  # residues per sequence with params.window; 0: windowed mode off


def describe_character(char: str) -> str:
    """A character a sequence may not hold, with the fix when there is an obvious one."""
    if char.isspace():
        return f"whitespace {ascii(char)}"
    if char.islower():
        return f"lowercase letter {ascii(char)} (use upper case)"
    if char == "*":
        return "'*' (a stop codon: strip it)"
    return ascii(char)


def letter_problem(text: str, allowed: frozenset[str], what: str = "", offset: int = 0) -> str | None:
    """The first character of `text` outside `allowed`, named with its 1-based position (as a person
    counts residues, and as variants like K2A count them), `offset` characters into the sequence;
    None when every character is allowed. One message for the server's refusals and the CLI's."""
    if allowed.issuperset(text):  # one pass in C; the Python loop below runs only to name a bad one
        return None
    for position, char in enumerate(text, start=offset + 1):
        if char not in allowed:
            return f"invalid character {describe_character(char)} at position {position}" + (f"; {what}" if what else "")
    return None
