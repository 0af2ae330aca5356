"""Windowed mode (our extension, issue 29): proteins longer than the model's context.

An item is cut into windows of `length` residues starting every `stride` residues, the last
ending at the item's last residue (docs/long-proteins.md). Each window is an ordinary item
for the scheduler, with its own BOS and EOS, so that windows batch with any other work, merge
with equal windows in flight and hit the result cache. Per-residue outputs are stitched: each
position is a convex combination of its rows in the windows that cover it, with the weights
of STITCH_RULE; pairs (contacts) likewise, over the windows that hold both residues.

Arithmetic is float64 over float32 rows, then rounded to float32 once: a position covered by
one window is that window's row exactly (w * x / w is exact for integer w up to 2**29).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from esm2_wire.windows import DEFAULT_LENGTH, window_starts

__all__ = ["DEFAULT_LENGTH", "Cover", "Span", "Window", "stitch_result", "window_outputs"]
# "mean": every covering window weighs the same; "centre": a window's row weighs min(i + 1, n - i),
# so rows far from a cut count more; "edge": the ESM-1b whole-proteome variant-effect work's
# weights (Brandes et al. 2023, Extended Data Fig. 5): 1, but a logistic ramp over the first and
# last quarter of the window (256 of 1,022 residues, midpoint 128, scale 16, scaled with the length).
RULES = ("mean", "centre", "edge")
STITCH_RULE = "mean"  # docs/long-proteins.md: the measured distances that chose it
# An item's stitched contact map is [L, L] float32: at most this many residues (256 MiB).
MAX_CONTACT_RESIDUES = 8192
_PAIR_ROW_BLOCK = 256  # rows of a contact map stitched at a time: float64 working memory is 2 * 256 * L * 8 bytes


@dataclass(frozen=True)
class Window:
    """A validated params.window."""

    length: int
    stride: int


@dataclass(frozen=True)
class Span:
    start: int  # 0-based first residue
    length: int  # residues

    @property
    def stop(self) -> int:
        return self.start + self.length


def window_weights(length: int, rule: str) -> np.ndarray:
    """float64 [length]: the weight of each row of a window of `length` residues."""
    if rule == "mean":
        return np.ones(length)
    rows = np.arange(length)
    if rule == "centre":
        return np.minimum(rows + 1, length - rows).astype(np.float64)
    ramp = length / 1022 * 256
    from_edge = np.minimum(rows + 1, length - rows)
    return np.where(from_edge < ramp, 1 / (1 + np.exp(-(from_edge - ramp / 2) / (ramp / 16))), 1.0)


@dataclass(frozen=True)
class Cover:
    """The windows of one item of `residues` residues, and how their rows are stitched."""

    residues: int
    spans: tuple[Span, ...]
    rule: str = STITCH_RULE

    @classmethod
    def of(cls, residues: int, window: Window, rule: str = STITCH_RULE) -> Cover:
        length = min(residues, window.length)
        return cls(residues, tuple(Span(s, length) for s in window_starts(residues, length, window.stride)), rule)

    def weights(self, span: Span) -> np.ndarray:
        return window_weights(span.length, self.rule)

    def coverage(self) -> np.ndarray:
        """int [residues]: how many windows cover each position."""
        counts = np.zeros(self.residues, dtype=np.int64)
        for span in self.spans:
            counts[span.start:span.stop] += 1
        return counts

    def covering(self, position: int) -> list[tuple[int, float]]:
        """(window index, normalised weight) of each window covering the 0-based `position`."""
        found = [(k, self.weights(span)[position - span.start]) for k, span in enumerate(self.spans)
                 if span.start <= position < span.stop]
        total = sum(w for _, w in found)
        return [(k, w / total) for k, w in found]

    def stitch(self, rows: list[np.ndarray]) -> np.ndarray:
        """One array [residues, ...] from each window's [span.length, ...] rows (float64 math)."""
        tail = rows[0].shape[1:]
        total = np.zeros((self.residues, *tail))
        weight = np.zeros(self.residues)
        for span, array in zip(self.spans, rows):
            w = self.weights(span)
            total[span.start:span.stop] += w.reshape(-1, *[1] * len(tail)) * array
            weight[span.start:span.stop] += w
        return total / weight.reshape(-1, *[1] * len(tail))

    def stitch_pairs(self, maps: list[np.ndarray]) -> np.ndarray:
        """float32 [residues, residues] from each window's [n, n] map: pair (i, j) weighs
        w(i) * w(j) in each window holding both; NaN where no window holds both."""
        size = self.residues
        out = np.full((size, size), np.nan, dtype=np.float32)
        for top in range(0, size, _PAIR_ROW_BLOCK):
            bottom = min(size, top + _PAIR_ROW_BLOCK)
            total = np.zeros((bottom - top, size))
            weight = np.zeros((bottom - top, size))
            for span, values in zip(self.spans, maps):
                first, last = max(top, span.start), min(bottom, span.stop)
                if first >= last:
                    continue
                w = self.weights(span)
                pair = np.outer(w[first - span.start:last - span.start], w)
                rows = slice(first - top, last - top)
                total[rows, span.start:span.stop] += pair * values[first - span.start:last - span.start]
                weight[rows, span.start:span.stop] += pair
            held = weight > 0
            block = out[top:bottom]
            block[held] = (total[held] / weight[held]).astype(np.float32)
        return out


def window_outputs(outputs: frozenset[OutputKind]) -> frozenset[OutputKind]:
    """What each window computes: `mean` is read from the stitched per-token rows."""
    if OutputKind.MEAN not in outputs:
        return outputs
    return (outputs - {OutputKind.MEAN}) | {OutputKind.PER_TOKEN}


def stitch_result(cover: Cover, windows: list[ItemResult], outputs: frozenset[OutputKind]) -> ItemResult:
    """An item's outputs from its windows' results: per_token and logits stitched, mean the mean
    of the stitched per_token rows, bos the first window's, contacts stitched pairs."""
    out = ItemResult()
    first = windows[0]
    layers = first.per_token.keys() or first.bos.keys()
    for layer in layers:
        if OutputKind.PER_TOKEN in outputs or OutputKind.MEAN in outputs:
            stitched = cover.stitch([w.per_token[layer] for w in windows])
            if OutputKind.PER_TOKEN in outputs:
                out.per_token[layer] = stitched.astype(np.float32)
            if OutputKind.MEAN in outputs:
                out.mean[layer] = stitched.mean(axis=0).astype(np.float32)
        if OutputKind.BOS in outputs:
            out.bos[layer] = first.bos[layer]
    if OutputKind.LOGITS in outputs:
        out.logits = cover.stitch([w.logits for w in windows]).astype(np.float32)
    if OutputKind.CONTACTS in outputs:
        out.contacts = cover.stitch_pairs([w.contacts for w in windows])
    return out
