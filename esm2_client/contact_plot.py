"""Contact maps as PNGs (`esm2 contacts FASTA --png DIR`): matplotlib, from the `plot` extra.

One panel per map: the map fills a square of MAP_PX pixels with one cell per residue (1-based
residue index on both axes), its colour bar beside it. Panels sit side by side at fixed pixel
positions, so a figure is PANEL_PX[0] x panels wide and PANEL_PX[1] high.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from esm2_wire.provenance import Provenance

DPI = 100
PANEL_PX = (620, 560)  # width, height of one panel
MAP_PX = 440  # the map's square side
MAP_ORIGIN_PX = (70, 60)  # the map's lower-left corner within its panel (from the panel's left, bottom)
COLORBAR_GAP_PX, COLORBAR_WIDTH_PX = 20, 18
MIN_SEPARATION = 6  # top-L contacts are counted between residues at least this far apart in sequence
COLORMAP = "viridis"  # lightness rises with the value: bright cells are likely contacts


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def top_contacts(contacts: np.ndarray, count: int | None = None) -> list[tuple[int, int]]:
    """The `count` (default L) most probable pairs (i < j, j - i >= MIN_SEPARATION), 0-based, best first."""
    length = contacts.shape[0]
    i, j = np.triu_indices(length, k=MIN_SEPARATION)
    order = np.argsort(-contacts[i, j], kind="stable")[: length if count is None else count]
    return [(int(i[k]), int(j[k])) for k in order]


def _axes_rect(panel: int, panels: int, x_px: int, width_px: int) -> list[float]:
    """[left, bottom, width, height] in figure fractions of a MAP_PX-high box in panel `panel`."""
    figure_w, figure_h = PANEL_PX[0] * panels, PANEL_PX[1]
    left = panel * PANEL_PX[0] + x_px
    return [left / figure_w, MAP_ORIGIN_PX[1] / figure_h, width_px / figure_w, MAP_PX / figure_h]


def figure_class():
    """matplotlib's Figure (no pyplot, no window); PlotUnavailable without the `plot` extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("drawing PNGs needs matplotlib: pip install 'esm2-service[plot]'") from None
    return Figure


RANDOM_MARK = "RANDOM WEIGHTS"


def titled(title: str, random_weights: bool) -> str:
    """A figure's title; a map from random weights says so first, so that no one takes it for a result."""
    return f"{RANDOM_MARK} (meaningless): {title}" if random_weights else title


def png_metadata(title: str, provenance: Provenance | None) -> dict:
    """PNG text chunks: the title, and where the numbers came from (esm2_wire.provenance)."""
    metadata = {"Title": title}
    if provenance is not None:
        metadata["Description"] = json.dumps(provenance.as_dict(), sort_keys=True)
    return metadata


def draw(path: Path, title: str, contacts: np.ndarray, attention: np.ndarray | None = None,
         provenance: Provenance | None = None) -> Path:
    """Write one PNG: the contact map with its top-L contacts circled above the diagonal, and
    the mean attention map (over layers and heads) beside it when given. With random weights the
    title starts with RANDOM WEIGHTS, in red."""
    random_weights = provenance is not None and provenance.random_weights
    title = titled(title, random_weights)
    Figure = figure_class()
    maps = [("contact probability", contacts, 1.0)]
    if attention is not None:
        maps.append(("mean attention", attention, None))
    figure = Figure(figsize=(PANEL_PX[0] * len(maps) / DPI, PANEL_PX[1] / DPI), dpi=DPI)
    length = contacts.shape[0]
    extent = (0.5, length + 0.5, length + 0.5, 0.5)  # cell centres on residue numbers 1..L
    for panel, (label, values, vmax) in enumerate(maps):
        ax = figure.add_axes(_axes_rect(panel, len(maps), MAP_ORIGIN_PX[0], MAP_PX))
        image = ax.imshow(values, cmap=COLORMAP, vmin=0.0, vmax=vmax if vmax is not None else float(values.max()),
                          interpolation="nearest", extent=extent, aspect="auto")
        ax.set_xlabel(f"residue (circled: top-L contacts, |i-j| >= {MIN_SEPARATION})" if panel == 0 else "residue")
        ax.set_ylabel("residue")
        ax.set_title(f"{title}: {label}" if panel == 0 else f"{label} (over layers and heads)", fontsize=10,
                     color="red" if random_weights else "black", fontweight="bold" if random_weights else "normal")
        bar = figure.add_axes(_axes_rect(panel, len(maps), MAP_ORIGIN_PX[0] + MAP_PX + COLORBAR_GAP_PX,
                                         COLORBAR_WIDTH_PX))
        figure.colorbar(image, cax=bar, label=label)
        if panel == 0:
            pairs = top_contacts(contacts)
            if pairs:  # above the diagonal: column j, row i (1-based); the lower triangle stays plain
                ax.scatter([j + 1 for i, j in pairs], [i + 1 for i, j in pairs], s=30, facecolors="none",
                           edgecolors="red", linewidths=1.0)
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
    path.parent.mkdir(parents=True, exist_ok=True)
    # No tight bbox: the size and the map's pixels stay where stated.
    figure.savefig(path, dpi=DPI, metadata=png_metadata(title, provenance))
    return path
