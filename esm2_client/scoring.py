"""Zero-shot scores from masked predictions: masked marginals and pseudo-log-likelihood.

The server's logits cover the 20 standard amino acids (columns named by vocab_tokens).
- Masked marginal (Meier et al. 2021): mask position i alone and score a substitution
  as log p(mt | x with i masked) - log p(wt | x with i masked). The log-softmax
  normaliser cancels, so this equals logit(mt) - logit(wt) exactly, whatever set of
  tokens it is taken over. A multi-mutant (`A23G:K45R`) scores the sum of its
  mutations' scores, each from its own single-position mask.
- Pseudo-log-likelihood: PLL = sum over positions i of log p(x_i | x with i masked),
  with log p the log-softmax over the 20 standard amino acids; positions holding a
  non-standard letter (X, B, Z, U, O) are skipped. Perplexity = exp(-PLL / n) over
  the n scored positions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from esm2_client.client import Esm2Client
from esm2_wire.vocabulary import MASK, STANDARD_AMINO_ACIDS

_MUTATION = re.compile(r"([A-Z])(\d+)([A-Z])")


@dataclass(frozen=True)
class Mutation:
    wild_type: str
    position: int  # 1-based
    mutant: str


def parse_variant(text: str, sequence: str) -> tuple[Mutation, ...]:
    """`A23G` or `A23G:K45R` checked against the wild-type sequence; ValueError names the problem."""
    mutations = []
    for part in text.strip().split(":"):
        match = _MUTATION.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{text!r}: {part!r} is not a mutation like A23G (wild type, 1-based position, mutant)")
        wild_type, position, mutant = match.group(1), int(match.group(2)), match.group(3)
        if not 1 <= position <= len(sequence):
            raise ValueError(f"{text!r}: position {position} is outside the sequence (1 to {len(sequence)})")
        if sequence[position - 1] != wild_type:
            raise ValueError(
                f"{text!r}: the wild type at position {position} is {sequence[position - 1]}, not {wild_type}"
            )
        for role, letter in (("wild type", wild_type), ("mutant", mutant)):
            if letter not in STANDARD_AMINO_ACIDS:
                raise ValueError(f"{text!r}: {role} {letter} is not one of the 20 standard amino acids")
        if any(m.position == position for m in mutations):
            raise ValueError(f"{text!r}: position {position} is mutated twice")
        mutations.append(Mutation(wild_type, position, mutant))
    return tuple(mutations)


def masked_at(sequence: str, position: int) -> str:
    return sequence[: position - 1] + MASK + sequence[position:]


def _masked_log_probs(client: Esm2Client, model: str, sequence: str,
                      positions: list[int]) -> tuple[dict[int, np.ndarray], dict[str, int]]:
    """(position -> log-softmax at that position with it alone masked, token -> column)."""
    outputs = client.predict([masked_at(sequence, p) for p in positions], model)
    rows = {}
    for position, output in zip(positions, outputs):
        logits = output.logits[position - 1].astype(np.float64)
        shifted = logits - logits.max()
        rows[position] = shifted - np.log(np.exp(shifted).sum())
    columns = {token: i for i, token in enumerate(outputs[0].vocab_tokens)} if outputs else {}
    return rows, columns


def masked_marginal_scores(client: Esm2Client, model: str, sequence: str,
                           variants: list[tuple[Mutation, ...]]) -> list[float]:
    """One score per variant: the sum of log p(mt) - log p(wt) over its mutations."""
    positions = sorted({m.position for variant in variants for m in variant})
    rows, columns = _masked_log_probs(client, model, sequence, positions)
    return [
        float(sum(rows[m.position][columns[m.mutant]] - rows[m.position][columns[m.wild_type]] for m in variant))
        for variant in variants
    ]


@dataclass(frozen=True)
class PseudoLikelihood:
    pseudo_log_likelihood: float
    scored_positions: int
    perplexity: float


def pseudo_log_likelihood(client: Esm2Client, model: str, sequence: str) -> PseudoLikelihood:
    positions = [i for i, letter in enumerate(sequence, start=1) if letter in STANDARD_AMINO_ACIDS]
    if not positions:
        return PseudoLikelihood(float("nan"), 0, float("nan"))
    rows, columns = _masked_log_probs(client, model, sequence, positions)
    total = float(sum(rows[p][columns[sequence[p - 1]]] for p in positions))
    return PseudoLikelihood(total, len(positions), math.exp(-total / len(positions)))
