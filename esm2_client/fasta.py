"""FASTA input (plain or gzipped) through Biopython's parser, checked before any request."""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from Bio import SeqIO

from esm2_wire.vocabulary import ENCODE_LETTERS, letter_problem


class InputError(Exception):
    """Input the user must fix; the message is one line naming the file and records."""


@dataclass(frozen=True)
class Record:
    id: str
    sequence: str


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_fasta(path: Path, allowed: frozenset[str] | None = ENCODE_LETTERS) -> list[Record]:
    """Records of `path`, which may be gzipped; ids unique; letters in `allowed` (None: left to the server)."""
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8") as handle:
            records = [Record(r.id, str(r.seq)) for r in SeqIO.parse(handle, "fasta")]
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, EOFError, ValueError) as exc:  # Biopython's format errors are ValueErrors
        reason = " ".join(str(exc).strip().split("\n\n")[0].split()) or type(exc).__name__
        raise InputError(f"{path}: not a readable FASTA file: {reason}") from None
    if not records:
        raise InputError(f"{path}: no FASTA records (a record starts with a '>id' line)")
    problems = []
    unnamed = [str(i + 1) for i, r in enumerate(records) if not r.id]
    if unnamed:
        problems.append(f"records without an id (record numbers {_listing(unnamed)})")
    duplicates = [i for i, n in Counter(r.id for r in records).items() if n > 1 and i]
    if duplicates:
        problems.append(f"duplicate ids {_listing(duplicates)}")
    empty = [r.id for r in records if not r.sequence]
    if empty:
        problems.append(f"empty sequences {_listing(empty)}")
    # Named as the server names them (esm2_wire.vocabulary): 1-based position, and the fix (upper case,
    # strip a stop codon's '*') where there is one.
    invalid = [f"{r.id}: {problem}" for r in records if allowed is not None
               for problem in [letter_problem(r.sequence, allowed)] if problem]
    if invalid:
        problems.append(f"{_listing(invalid, limit=5)} (allowed: {''.join(sorted(allowed))})")
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems))
    return records
