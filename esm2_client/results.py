"""Typed results of the client's calls that are not stream outputs (those are
esm2_client.streams.ItemOutputs): numpy arrays, and reprs by shape and dtype."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esm2_wire.item_result import short_repr
from esm2_wire.provenance import Provenance


@dataclass(frozen=True, repr=False)
class ScoreResult:
    """Scores of one (wild type, variants) item, natural-log units."""

    sequence_index: int
    scores: np.ndarray  # float64 [variants], in request order
    # "pll" only: the wild type's pseudo-log-likelihood, the positions scored, each variant's PLL.
    pseudo_log_likelihood: float | None = None
    scored_positions: int | None = None
    variant_pseudo_log_likelihoods: np.ndarray | None = None  # float64 [variants]
    provenance: Provenance | None = None  # from the call's trailing metadata

    __repr__ = short_repr

    @classmethod
    def of_proto(cls, message, provenance: Provenance | None) -> ScoreResult:
        pll = message.HasField("pseudo_log_likelihood")
        return cls(
            sequence_index=message.sequence_index,
            scores=np.array(message.scores, dtype=np.float64),
            pseudo_log_likelihood=message.pseudo_log_likelihood if pll else None,
            scored_positions=message.scored_positions if pll else None,
            variant_pseudo_log_likelihoods=np.array(message.variant_pseudo_log_likelihoods, dtype=np.float64)
            if pll else None,
            provenance=provenance,
        )
