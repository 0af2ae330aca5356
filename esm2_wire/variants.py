"""Variants in the usual notation (`K2A`, `T3G:Y5W`), read against their wild type.

Shared by the server (Score checks every variant it is sent) and the CLI (which names the
CSV row of a bad one before sending anything).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from esm2_wire.vocabulary import MASK, STANDARD_AMINO_ACIDS

_MUTATION = re.compile(r"([A-Z])(\d{1,9})([A-Z])")


@dataclass(frozen=True)
class Mutation:
    wild_type: str
    position: int  # 1-based
    mutant: str


Variant = tuple[Mutation, ...]


def _shown(text: str) -> str:
    """A caller's text in a message: at most 40 characters, ASCII-escaped."""
    return ascii(text) if len(text) <= 40 else ascii(text[:37]) + f"... ({len(text)} characters)"


def parse_variant(text: str, sequence: str) -> Variant:
    """`A23G` or `A23G:K45R` checked against the wild-type sequence; ValueError names the problem."""
    mutations: list[Mutation] = []
    for part in text.strip().split(":", len(sequence)):  # more parts than positions: one is mutated twice
        match = _MUTATION.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{_shown(text)}: {_shown(part)} is not a mutation like A23G "
                             "(wild type, 1-based position, mutant)")
        wild_type, position, mutant = match.group(1), int(match.group(2)), match.group(3)
        if not 1 <= position <= len(sequence):
            raise ValueError(f"{_shown(text)}: position {position} is outside the sequence (1 to {len(sequence)})")
        if sequence[position - 1] != wild_type:
            raise ValueError(f"{_shown(text)}: the wild type at position {position} is "
                             f"{sequence[position - 1]}, not {wild_type}")
        for role, letter in (("wild type", wild_type), ("mutant", mutant)):
            if letter not in STANDARD_AMINO_ACIDS:
                raise ValueError(f"{_shown(text)}: {role} {letter} is not one of the 20 standard amino acids")
        if any(m.position == position for m in mutations):
            raise ValueError(f"{_shown(text)}: position {position} is mutated twice")
        mutations.append(Mutation(wild_type, position, mutant))
    return tuple(mutations)


def masked_at(sequence: str, position: int) -> str:
    """`sequence` with its residue at the 1-based `position` replaced by `<mask>`."""
    return sequence[: position - 1] + MASK + sequence[position:]
