"""Where windowed mode's windows lie and how their rows are stitched (service.api.windows),
as pure functions; tests/test_windows.py checks the served outputs against fair-esm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from esm2_wire.output_kinds import OutputKind
from service.api.validation import Limits, parse_window
from service.api.windows import Cover, Window, window_outputs, window_weights
from service.errors import InvalidRequest


@given(residues=st.integers(1, 5000), length=st.integers(1, 1100), stride_share=st.floats(0.01, 1.0))
def test_windows_cover_every_residue_and_the_last_ends_at_the_last(residues, length, stride_share):
    stride = max(1, int(length * stride_share))
    spans = Cover.of(residues, Window(length, stride)).spans
    assert spans[0].start == 0 and spans[-1].stop == residues
    assert all(span.length == min(length, residues) for span in spans)
    starts = [span.start for span in spans]
    assert starts == sorted(set(starts))  # no window twice
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # no gap: stride <= length
    assert Cover.of(residues, Window(length, stride)).coverage().min() >= 1


def test_the_documented_geometry():
    assert [s.start for s in Cover.of(5000, Window(1022, 1000)).spans] == [0, 1000, 2000, 3000, 3978]
    assert [s.start for s in Cover.of(2044, Window(1022, 511)).spans] == [0, 511, 1022]
    assert Cover.of(700, Window(1022, 511)).spans == Cover.of(700, Window(700, 1)).spans  # one window: the item


def test_a_position_covered_once_is_its_window_row_bit_for_bit_and_overlaps_average():
    rng = np.random.default_rng(0)
    cover = Cover.of(30, Window(12, 9))  # starts 0, 9, 18
    rows = [rng.standard_normal((12, 5)).astype(np.float32) * 60 for _ in cover.spans]
    stitched = cover.stitch(rows).astype(np.float32)
    assert np.array_equal(stitched[:9], rows[0][:9])
    assert np.array_equal(stitched[12:18], rows[1][3:9])
    np.testing.assert_allclose(stitched[9:12], ((rows[0][9:12].astype(np.float64) + rows[1][:3]) / 2).astype(np.float32))


def test_other_rules_are_convex_combinations_too():
    rng = np.random.default_rng(1)
    for rule in ("centre", "edge"):
        cover = Cover(40, Cover.of(40, Window(16, 6)).spans, rule)
        rows = [rng.standard_normal((16, 3)) for _ in cover.spans]
        stitched = cover.stitch(rows)
        lows = np.full((40, 3), np.inf)
        highs = np.full((40, 3), -np.inf)
        for span, r in zip(cover.spans, rows):
            lows[span.start:span.stop] = np.minimum(lows[span.start:span.stop], r)
            highs[span.start:span.stop] = np.maximum(highs[span.start:span.stop], r)
        assert np.all(stitched >= lows - 1e-12) and np.all(stitched <= highs + 1e-12), rule
        assert window_weights(16, rule).min() > 0


def test_pairs_outside_every_window_are_nan_and_inside_the_average():
    cover = Cover.of(10, Window(6, 4))  # starts 0, 4: rows 4-5 shared; pairs (0..3, 6..9) in no window
    maps = [np.full((6, 6), 1.0, dtype=np.float32), np.full((6, 6), 3.0, dtype=np.float32)]
    out = cover.stitch_pairs(maps)
    assert np.isnan(out[0, 9]) and np.isnan(out[9, 0]) and np.isnan(out[3, 6])
    assert out[0, 5] == 1.0 and out[9, 4] == 3.0 and out[4, 5] == 2.0


def test_mean_is_read_from_per_token_rows():
    assert window_outputs(frozenset({OutputKind.MEAN, OutputKind.BOS})) == {
        OutputKind.PER_TOKEN, OutputKind.BOS}
    assert window_outputs(frozenset({OutputKind.LOGITS})) == {OutputKind.LOGITS}


def test_parse_window_defaults_and_bounds():
    on = Limits(max_windowed_residues=40_000)
    assert parse_window(0, 0, on) == Window(1022, 511)
    assert parse_window(100, 0, on) == Window(100, 50)
    with pytest.raises(InvalidRequest) as caught:
        parse_window(0, 0, Limits())
    assert [p.field for p in caught.value.problems] == ["params.window"]
    with pytest.raises(InvalidRequest) as caught:
        parse_window(4096, 5000, on)
    assert [p.field for p in caught.value.problems] == ["params.window.length", "params.window.stride"]
