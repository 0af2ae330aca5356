"""log_prob and Score in windowed mode (docs/long-proteins.md).

The passes are windows: a window of the wild type (wt_marginal, log_prob), or a window of a
sequence with one position masked, for each window covering that position (masked_marginal,
pll). They are ordinary LOGITS-only passes, so they batch, merge and cache like any other.
A score reads, at each position, the convex combination (service.api.windows.STITCH_RULE) of
the log-softmax rows of the windows covering it: log_prob sums the stitched log-probabilities;
a masked marginal averages the position's rows over the windows that mask it; pll sums them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from esm2_wire.vocabulary import MASK
from service.api.scoring import PassRows, ScoreItem, ScorePlan, Tokens, log_softmax, masked, scored_positions
from service.api.windows import Cover, Window


def _mutated_positions(item: ScoreItem) -> list[int]:
    return sorted({m.position for v in item.variants for m in v})


def passes_needed(method: str, items: list[ScoreItem], window: Window) -> int:
    """Window passes a request costs before equal ones merge (scoring.passes_needed, per window)."""
    total = 0
    for item in items:
        cover = Cover.of(len(item.tokens), window)
        if method == "wt_marginal":
            total += len(cover.spans)
            continue
        counts = cover.coverage()
        if method == "masked_marginal":
            total += int(sum(counts[p - 1] for p in _mutated_positions(item)))
        else:
            scored = np.array(scored_positions(item.tokens), dtype=np.int64)
            total += int(counts[scored - 1].sum() if scored.size else 0) * (1 + len(item.variants))
    return total


def plan_of(method: str, items: list[ScoreItem], window: Window) -> ScorePlan:
    """The distinct window passes of a request, in first-use order."""
    plan = ScorePlan(method, items)
    for item in items:
        cover = Cover.of(len(item.tokens), window)

        def need_masked(tokens: Tokens, position: int) -> None:
            for span in cover.spans:
                if span.start < position <= span.stop:
                    plan.need(masked(tokens[span.start:span.stop], position - span.start))

        if method == "wt_marginal":
            for span in cover.spans:
                plan.need(item.tokens[span.start:span.stop])
        elif method == "masked_marginal":
            for position in _mutated_positions(item):
                need_masked(item.tokens, position)
        else:
            for tokens in (item.tokens, *map(item.mutant, item.variants)):
                for position in scored_positions(tokens):
                    need_masked(tokens, position)
    return plan


class WindowedRows:
    """The rows scoring.item_scores reads, for whole sequences: at a position, the convex
    combination of that position's log-softmax rows in the window passes covering it."""

    def __init__(self, plan: ScorePlan, window: Window):
        self.plan = plan
        self.window = window
        self.passes = PassRows(plan)
        self._cover = lru_cache(maxsize=None)(lambda residues: Cover.of(residues, window))

    def add(self, pass_index: int, logits: np.ndarray) -> None:
        self.passes.add(pass_index, logits)

    def pass_indexes(self, tokens: Tokens) -> list[int]:
        """The window passes the rows of `tokens` (a whole sequence) are read from: those covering its
        `<mask>`, or every window of an unmasked one."""
        cover = self._cover(len(tokens))
        spans = cover.spans
        if MASK in tokens:
            position = tokens.index(MASK)
            spans = [span for span in spans if span.start <= position < span.stop]
        return [self.plan._index[tokens[span.start:span.stop]] for span in spans]

    def row(self, tokens: Tokens, position: int) -> np.ndarray:
        cover = self._cover(len(tokens))
        total = 0.0
        for k, weight in cover.covering(position - 1):
            span = cover.spans[k]
            total = total + weight * self.passes.row(tokens[span.start:span.stop], position - span.start)
        return total


def log_prob(tokens: Tokens, cover: Cover, window_logits: list[np.ndarray], columns: dict[str, int]) -> float:
    """BioLM's log_prob over stitched log-probabilities: each window's logits log-softmaxed,
    stitched, then the residues present summed (standard amino acids only)."""
    positions = scored_positions(tokens)
    if not positions:
        return 0.0
    stitched = cover.stitch([log_softmax(logits) for logits in window_logits])
    rows = np.array(positions) - 1
    return float(stitched[rows, [columns[tokens[p - 1]] for p in positions]].sum())
