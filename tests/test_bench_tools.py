"""The benchmark's stand-alone tools still run: the bf16 accuracy report and the kernel profile.

Like test_bench_smoke, nothing here looks at how fast anything was; the accuracy bounds are
the ones tests/test_precision.py holds the served model to.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import REPO

from bench import accuracy
from service.models.checkpoints import load


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_accuracy_report_compares_bf16_with_fp32(tmp_path):
    out = _run("bench.accuracy", "--models", "tiny", "--sequences", "2", "--max-length", "300",
               "--cache-dir", str(tmp_path))
    (report,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert report["model"] == "esm2-tiny" and report["precision"] == "bf16" and report["sequences"] >= 8
    assert 0 < report["embeddings_max_rel_diff"] < 0.02
    assert report["mean_embedding_cosine_min"] >= 0.999 and report["logits_top1_agreement"] >= 0.95
    # A random-weight contact map is nearly flat, so its top-L ranking under bf16 means little
    # (BENCHMARKS.md); the probabilities themselves stay within 0.01 (measured: 0.001-0.002).
    assert report["contacts_sequences"] == report["sequences"] and 0 < report["contacts_max_abs_diff"] < 0.01


def test_accuracy_report_of_identical_passes_is_exact(tiny_checkpoint):
    """The report's measures against themselves: fp32 vs fp32 agrees on every top-L contact,
    every top-1 logit, and differs by nothing."""
    report = accuracy.compare(load("esm2-tiny", tiny_checkpoint), ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "GSHMSLFDFFKNKG"],
                              "fp32")
    assert report["contacts_sequences"] == 2 and report["contacts_topL_agreement"] == 1.0
    assert report["logits_top1_agreement"] == 1.0 and report["mean_embedding_cosine_min"] == pytest.approx(1.0)
    assert report["embeddings_max_abs_diff"] == 0 and report["contacts_max_abs_diff"] == 0


@pytest.mark.slow
def test_kernel_profile_splits_both_programs_time(tmp_path):
    out = _run("bench.kernel_profile", "--models", "tiny", "--sequences", "2", "--cache-dir", str(tmp_path))
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| esm2-tiny |")]
    assert [row[1].strip() for row in rows] == ["service forward (fast path)", "HF EsmModel sdpa"]
    for row in rows:
        wall, gemm, attention, other = map(float, row[2:6])
        share = float(row[6].strip().rstrip("%"))
        assert wall > 0 and gemm > 0 and attention > 0 and other >= 0 and 0 < share <= 100


def test_accuracy_report_compares_int8_with_fp32_for_every_output(tmp_path):
    out = _run("bench.accuracy", "--models", "tiny", "--precision", "int8", "--sequences", "2", "--max-length", "300",
               "--cache-dir", str(tmp_path), "--markdown")
    (report,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert report["precision"] == "int8" and 0 < report["embeddings_max_rel_diff"] < 0.1
    for kind in ("mean", "bos"):
        assert report[f"{kind}_embedding_cosine_min"] >= 0.99 and 0 < report[f"{kind}_embedding_rel_error_max"] < 0.1
    assert 0 < report["per_token_rel_error_max"] < 0.1 and report["logits_top1_agreement"] >= 0.9
    assert 0 <= report["contacts_topL_agreement"] <= 1
    assert "| esm2-tiny | int8 |" in out
