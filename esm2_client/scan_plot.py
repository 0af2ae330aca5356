"""A mutational scan as a heatmap PNG (`esm2 score --scan --png FILE`): matplotlib, from the `plot` extra.

Columns are positions (1-based), rows the 20 standard amino acids (alphabetical, as the CSV); a
cell is the score of that substitution, coloured on a diverging scale centred on 0 (red: the
model likes the mutant less than the wild type, blue: more). The wild type's own cell of each
column has no score: it is left blank and ringed in black. Scores of random weights carry the
RANDOM WEIGHTS title of esm2_client.contact_plot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esm2_client.contact_plot import DPI, figure_class, png_metadata, titled
from esm2_client.scoring import MUTANTS
from esm2_wire.provenance import Provenance

CELL_PX = 14  # one cell's height, and its width unless the map would be narrower than MIN_MAP_PX
MIN_MAP_PX = 420  # a short scan's cells are widened to this, so that the title fits
MARGIN_PX = (80, 150, 60, 60)  # left, right (colour bar), bottom, top
COLORMAP = "RdBu"


def score_matrix(sequence: str, first: int, last: int, scores: dict[str, float]) -> np.ndarray:
    """[20, positions] of `scores` by variant (`K2A`), NaN where there is none (the wild type's cells,
    positions whose wild type is not standard)."""
    matrix = np.full((len(MUTANTS), last - first + 1), np.nan)
    for column, position in enumerate(range(first, last + 1)):
        for row, mutant in enumerate(MUTANTS):
            value = scores.get(f"{sequence[position - 1]}{position}{mutant}")
            if value is not None:
                matrix[row, column] = value
    return matrix


def draw(path: Path, title: str, sequence: str, first: int, last: int, scores: dict[str, float], method: str,
         provenance: Provenance | None = None) -> Path:
    Figure = figure_class()
    matrix = score_matrix(sequence, first, last, scores)
    columns = last - first + 1
    left, right, bottom, top = MARGIN_PX
    map_width = max(CELL_PX * columns, MIN_MAP_PX)
    width, height = left + right + map_width, bottom + top + CELL_PX * len(MUTANTS)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = figure.add_axes([left / width, bottom / height, map_width / width, CELL_PX * len(MUTANTS) / height])
    bound = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    extent = (first - 0.5, last + 0.5, len(MUTANTS) - 0.5, -0.5)
    image = ax.imshow(matrix, cmap=COLORMAP, vmin=-bound, vmax=bound, interpolation="nearest", extent=extent,
                      aspect="auto")
    wild = [(position, MUTANTS.index(sequence[position - 1])) for position in range(first, last + 1)
            if sequence[position - 1] in MUTANTS]
    ax.scatter([p for p, _ in wild], [r for _, r in wild], s=CELL_PX * 4, marker="s", facecolors="none",
               edgecolors="black", linewidths=1.0)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_yticks(range(len(MUTANTS)), list(MUTANTS), fontsize=7)
    ax.set_xlabel("position (1-based; ringed: the wild type)")
    ax.set_ylabel("mutant")
    random_weights = provenance is not None and provenance.random_weights
    full_title = titled(f"{title}: {method} scan", random_weights)
    ax.set_title(full_title, fontsize=10, loc="left", color="red" if random_weights else "black",
                 fontweight="bold" if random_weights else "normal")
    bar = figure.add_axes([(left + map_width + 20) / width, bottom / height, 15 / width,
                           CELL_PX * len(MUTANTS) / height])
    figure.colorbar(image, cax=bar, label=f"{method} score (natural log)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, metadata=png_metadata(full_title, provenance))
    return path
