"""The benchmark harness still runs end to end: `python -m bench.run --quick` on the tiny model.

Benchmarks are not tests: nothing here looks at how fast anything was, only that every case
ran against real servers and the report is well formed.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from support import REPO

from bench import cases, scheduling, speedups
from bench.run import CASE_GROUPS, SPEED_GROUPS

# The time limit is above the bench run's own (600 s, _quick_run), whose failure shows its stderr;
# pytest-timeout's 300 s cut a parallel run's quick bench (300 s there, CPU shared with 3 workers).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCHEDULER_GROUPS = ("hol", "cache")  # smoke-tested apart, each test within its own time limit


def _quick_run(tmp_path, groups):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--cases", ",".join(groups),
         "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result_file,) = out.glob("*.json")
    (markdown_file,) = out.glob("*.md")
    return json.loads(result_file.read_text()), markdown_file


def test_quick_bench_writes_a_complete_report(tmp_path):
    run, markdown_file = _quick_run(tmp_path, [g for g in CASE_GROUPS if g not in SCHEDULER_GROUPS + SPEED_GROUPS])

    assert run["machine"]["cpu_cores"] >= 1 and run["machine"]["torch"]
    assert run["matmul_flops_per_s"] > 0
    by_case = {m["case"]: m for m in run["measurements"] if m["model"] == "esm2-tiny"}
    timed = [m for m in by_case.values() if m["seconds"]]
    assert {cases.BASELINE_MEAN, cases.BASELINE_CONTACTS, cases.forward_fast_case(),
            cases.FORWARD_EXACT} <= set(by_case)
    for clients in (1, 8, 32):
        for items in (8, 1):
            assert cases.grpc_mean_case(clients, items) in by_case
    for include in ("per_token", "logits", "contacts"):
        streamed = by_case[cases.stream_case(include)]
        assert streamed["bytes_per_s"] > 0
    for include in ("mean", "per_token"):  # through Envoy, unless the gateway is missing (then a stated skip)
        json_case = by_case[cases.json_case(include)]
        assert json_case["skipped"] or json_case["bytes_per_s"] > 0
    for m in timed:
        assert m["residues_per_s"] > 0 and m["flops_per_s"] > 0, m["case"]
        if m["case"].startswith("gRPC"):
            assert 0 < m["padding_efficiency"] <= 1, m["case"]

    # The peers, each at the budget its sweep found best; the HF peer computes what stock computes.
    for case in (cases.BEST_STOCK, cases.HF_MEAN, cases.HF_LOGITS):
        assert by_case[case]["seconds"] and by_case[case]["extra"]["toks_per_batch"] in (1024, 2048, 4096)
    hf = by_case[cases.HF_MEAN]["extra"]
    assert hf["parity_vs_stock"]["max_abs_diff_representations"] < 1e-4
    assert set(hf["sweep_residues_per_s"]) == {"stock", "hf"}
    assert any(t["target"].startswith("gRPC 8x8 mean, default settings / best peer") for t in run["targets"])
    assert "service / best peer" in markdown_file.read_text()
    # ONNX Runtime fp32 on the exported HF EsmModel: timed at its best budget, the same function as
    # stock, and both of issue 28's fp32 targets checked against it and HF; the CPU flags are named.
    ort = by_case[cases.ORT_MEAN]
    assert ort["seconds"] and ort["extra"]["toks_per_batch"] in (1024, 2048, 4096)
    assert ort["extra"]["parity_vs_stock"]["max_abs_diff_representations"] < 1e-4
    fp32_targets = {t["target"] for t in run["targets"] if t["model"] == "esm2-tiny"}
    assert any("/ ONNX Runtime fp32" in t for t in fp32_targets) and any("/ HF transformers EsmModel" in t
                                                                       for t in fp32_targets)
    assert platform.machine() != "x86_64" or "avx2" in run["machine"]["cpu_flags"]
    assert "| service / ONNX Runtime |" in markdown_file.read_text()
    assert "CPU flags: " in markdown_file.read_text()

    latency = by_case[cases.LATENCY]["extra"]
    assert latency["requests"] == 20 and 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert all(v > 0 for v in by_case[cases.SERVER_RSS]["extra"]["peak_rss_mib"].values())

    for case in (cases.PEER_EXTRACT, cases.PEER_EMBED):
        assert by_case[case]["seconds"] and by_case[case]["residues_per_s"] > 0, case
    (peer,) = run["peer"]
    assert peer["model"] == "esm2-tiny" and peer["ratio"] > 0 and peer["server_startup_s"] > 0
    assert "bench.esm_extract" in peer["esm_extract_command"] or "esm-extract" in peer["esm_extract_command"]

    (contacts,) = [m for m in run["measurements"] if m["case"].startswith(cases.CONTACTS_MEMORY)]
    assert contacts["extra"]["allclose_1e5"] and contacts["extra"]["served_chunks"] > 0
    assert contacts["extra"]["stock_peak_rss_mib"] > 0 and contacts["extra"]["ours_peak_rss_mib"] > 0

    assert {t["target"] for t in run["targets"]} >= {"gRPC 8x8 mean, default settings / baseline",
                                                      "gRPC 32 clients x 1 item / 8x8"}
    skipped = [m for m in run["measurements"] if m["skipped"]]
    assert all(m["skipped"] for m in skipped)  # each slot says why it did not run
    report = markdown_file.read_text()
    assert "| esm2-tiny | baseline: stock fair-esm, mean |" in report and "Targets checked" in report
    assert "esm-extract / esm2 embed" in report


def test_quick_scheduler_cases_report_both_policies_and_the_cache(tmp_path):
    run, markdown_file = _quick_run(tmp_path, SCHEDULER_GROUPS)
    by_case = {m["case"]: m for m in run["measurements"] if m["model"] == "esm2-tiny"}
    hol = by_case[scheduling.HEAD_OF_LINE]["extra"]
    for policy in ("default", "first come, first served (before)"):
        assert hol[policy]["beside_huge"]["n"] >= 1 and 0 < hol[policy]["alone"]["p50_ms"] <= hol[policy]["alone"]["p99_ms"]
        assert hol[policy]["huge_request_s"] > 0
    repeats = by_case[scheduling.REPEATS]["extra"]
    assert repeats["cache"]["hits"] > 0 and repeats["cache"]["bytes"] > 0
    assert repeats["latency"]["miss_over_hit_p50"] > 0 and repeats["fasta_twice_gain"] > 0
    report = markdown_file.read_text()
    assert "Head-of-line blocking" in report and "Repeats: the result cache" in report


def test_quick_depth_and_packed_cases_report_paired_ratios(tmp_path):
    """Early exit and packed: each case ran, and each ratio comes from back-to-back pairs."""
    run, markdown_file = _quick_run(tmp_path, ("depth", "packed"))
    by_case = {m["case"]: m for m in run["measurements"] if m["model"] == "esm2-tiny"}
    shallow = by_case[speedups.depth_case(1)]
    assert shallow["seconds"] and by_case[speedups.depth_case(-1)]["seconds"]
    assert len(shallow["extra"]["paired_speedup_vs_last_layer"]) == len(shallow["seconds"])
    packed = by_case[speedups.PACKED.format(budget=1024)]
    assert packed["seconds"] and len(packed["extra"]["paired_vs_padded"]) == len(packed["seconds"])
    report = markdown_file.read_text()
    assert "Stopping at the deepest layer asked for" in report and "Packed vs padded forward" in report


def test_quick_int8_case_compares_four_ways_in_pairs(tmp_path):
    """int8: service int8 and fp32, HF fp32 at its best budget and HF int8, each ratio from pairs."""
    run, markdown_file = _quick_run(tmp_path, ("int8",))
    by_case = {m["case"]: m for m in run["measurements"] if m["model"] == "esm2-tiny"}
    for case in speedups.INT8_CASES:
        assert by_case[case]["seconds"] and by_case[case]["residues_per_s"] > 0, case
    assert set(by_case[speedups.INT8_SERVICE]["extra"]["paired_vs"]) == set(speedups.INT8_CASES[1:])
    assert by_case[speedups.HF_FP32]["extra"]["toks_per_batch"] == 1024  # --quick sweeps one budget
    assert "int8 on CPU" in markdown_file.read_text()
