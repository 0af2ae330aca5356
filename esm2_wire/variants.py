"""Variants in the usual notation (`K2A`, `T3G:Y5W`), read against their wild type.

One strict grammar, shared by the server (Score checks every variant it is sent, JSON or
gRPC), the client and CLI (which name the CSV row of a bad one before sending anything) and
the JSON schema (`VARIANT_PATTERN`): ASCII capital letters, ASCII digits, `:` between
mutations, nothing else (no whitespace, no other script's digits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from esm2_wire.vocabulary import MASK, STANDARD_AMINO_ACIDS

MAX_POSITION_DIGITS = 9
MAX_MUTATION_CHARS = 1 + MAX_POSITION_DIGITS + 1  # wild type, position, mutant
_MUTATION_TEXT = f"[A-Z][0-9]{{1,{MAX_POSITION_DIGITS}}}[A-Z]"  # ASCII only: no \d, which takes any script's digits
VARIANT_PATTERN = f"^{_MUTATION_TEXT}(:{_MUTATION_TEXT})*$"
_MUTATION = re.compile(f"([A-Z])([0-9]{{1,{MAX_POSITION_DIGITS}}})([A-Z])")
_VARIANT = re.compile(VARIANT_PATTERN)


@dataclass(frozen=True)
class Mutation:
    wild_type: str
    position: int  # 1-based
    mutant: str


Variant = tuple[Mutation, ...]


def _shown(text: str) -> str:
    """A caller's text in a message: at most 40 characters, ASCII-escaped."""
    return ascii(text) if len(text) <= 40 else ascii(text[:37]) + f"... ({len(text)} characters)"


def mutations_in(text: str) -> int:
    """The mutations `text` holds, counted without parsing it: its `:`-separated parts."""
    return text.count(":") + 1


def oversized(text: str) -> str | None:
    """Why `text` is longer than any variant of its mutation count can be (None if it is not):
    a check of its length alone, so that no variant is parsed before the request's bounds hold."""
    mutations = mutations_in(text)
    longest = mutations * (MAX_MUTATION_CHARS + 1) - 1
    if len(text) <= longest:
        return None
    return (f"{_shown(text)}: {len(text)} characters for {mutations} mutations; a variant of {mutations} "
            f"is at most {longest} (a mutation is at most {MAX_MUTATION_CHARS}: wild type, position, mutant)")


def parse_variant(text: str, sequence: str) -> Variant:
    """`A23G` or `A23G:K45R` checked against the wild-type sequence; ValueError names the problem.
    Linear in the text: repeated positions are found with a set."""
    # The grammar first, over the whole text, so that a variant outside it is always named as
    # such (not by whatever its first grammatical mutation gets wrong); the schema agrees.
    if _VARIANT.fullmatch(text) is None:
        bad = next((part for part in text.split(":") if _MUTATION.fullmatch(part) is None), text)
        raise ValueError(f"{_shown(text)}: {_shown(bad)} is not a mutation like A23G "
                         "(wild type, 1-based position, mutant)")
    mutations: list[Mutation] = []
    positions: set[int] = set()
    parts = text.split(":", len(sequence))
    if len(parts) > len(sequence):  # more mutations than positions: the next one repeats a position or is outside
        parts[-1] = parts[-1].split(":", 1)[0]
    for part in parts:
        match = _MUTATION.fullmatch(part)
        wild_type, position, mutant = match.group(1), int(match.group(2)), match.group(3)
        if not 1 <= position <= len(sequence):
            raise ValueError(f"{_shown(text)}: position {position} is outside the sequence (1 to {len(sequence)})")
        if sequence[position - 1] != wild_type:
            raise ValueError(f"{_shown(text)}: the wild type at position {position} is "
                             f"{sequence[position - 1]}, not {wild_type}")
        for role, letter in (("wild type", wild_type), ("mutant", mutant)):
            if letter not in STANDARD_AMINO_ACIDS:
                raise ValueError(f"{_shown(text)}: {role} {letter} is not one of the 20 standard amino acids")
        if position in positions:
            raise ValueError(f"{_shown(text)}: position {position} is mutated twice")
        positions.add(position)
        mutations.append(Mutation(wild_type, position, mutant))
    return tuple(mutations)


def masked_at(sequence: str, position: int) -> str:
    """`sequence` with its residue at the 1-based `position` replaced by `<mask>`."""
    return sequence[: position - 1] + MASK + sequence[position:]
