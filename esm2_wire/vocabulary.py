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
