"""The scoring benchmark still runs end to end: `python -m bench.scoring_cases --quick` (tiny model).

Nothing here looks at how fast anything was; the harness itself refuses to report when the
three paths (server Score, client-side Predict, the transformers script) disagree on a score.
"""

from __future__ import annotations

import json
import subprocess
import sys

from support import REPO


def test_quick_scoring_bench_writes_a_complete_report(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scoring_cases", "--quick", "--cache-dir", str(tmp_path / "cache"),
         "--out-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result_file,) = out.glob("scoring-*.json")
    (markdown_file,) = out.glob("scoring-*.md")
    (result,) = json.loads(result_file.read_text())["results"]
    assert result["model"] == "esm2-tiny"
    for case in ("pll", "scan"):
        paths = {"server", "client-side", "hf script"}
        assert set(result["median_s"][case]) == set(result["paired_ratios"][case]) == paths
        assert all(seconds > 0 for seconds in result["median_s"][case].values())
    assert set(result["max_abs_difference_vs_server"]) == {
        "pll: client-side", "pll: hf script", "scan: client-side", "scan: hf script"}
    assert str(result["hf_batch"]) in result["hf_sweep_s_per_pass"]  # JSON keys are strings
    text = markdown_file.read_text()
    assert "| esm2-tiny | pll: 3 x 40 residues" in text and "| esm2-tiny | scan: 19 x 8 positions" in text
