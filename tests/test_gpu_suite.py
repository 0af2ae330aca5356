"""The GPU suite (bench/gpu_suite.py) without a GPU: its dry run takes every step on the
simulated CUDA device (tests/simulated_cuda.py) to a report whose target is checked, writing the
results after each model; a bad model list or a missing device is refused before any work."""

from __future__ import annotations

import json
import os

import pytest

from bench import gpu_suite
from bench import run as bench_run
from service import platforms


@pytest.fixture
def suite(monkeypatch, tmp_path):
    """bench.run's main in this process, its process-wide changes undone afterwards."""
    monkeypatch.setattr(bench_run.signal, "signal", lambda *args: None)
    previous = platforms.cuda_runtime(), os.environ.get("ESM_DEVICE_PLUGIN")  # the dry run sets both
    yield lambda *flags: bench_run.main(["--gpu-suite", "--out-dir", str(tmp_path / "out"),
                                         "--cache-dir", str(tmp_path / "cache"), *flags])
    platforms.set_cuda_runtime(previous[0])
    if previous[1] is None:
        os.environ.pop("ESM_DEVICE_PLUGIN", None)
    else:
        os.environ["ESM_DEVICE_PLUGIN"] = previous[1]


def test_the_dry_run_reports_every_case_and_keeps_each_models_results(suite, tmp_path, monkeypatch):
    """Two models; the second fails as it loads (a crash at 3B, as the suite had). The first
    model's every case, its full request path and its target are on disk all the same."""
    real_load = gpu_suite.load

    def load(name, path):
        if name == "esm2-wide":
            raise RuntimeError("the second model fails to load")
        return real_load(name, path)

    monkeypatch.setattr(gpu_suite, "load", load)
    with pytest.raises(RuntimeError, match="second model"):
        suite("--dry-run", "--suite-models", "tiny,wide")
    (results,) = (tmp_path / "out").glob("*.json")
    run = json.loads(results.read_text())
    assert run["device"] == "cuda:0 (simulated: tests/simulated_cuda.py)"
    measured = {m["case"].split(" (toks")[0] for m in run["measurements"] if m["model"] == "esm2-tiny" and m["seconds"]}
    assert measured == {"baseline: stock fair-esm, mean", "HF transformers sdpa fp32", "HF transformers sdpa bf16",
                        *(f"service forward, fast path (SDPA) {p}" for p in ("fp32", "bf16", "fp16")),
                        *(f"service forward, packed (varlen) {p}" for p in ("bf16", "fp16")),
                        "service full path: server + 4 gRPC clients, 2 items/request"}
    (target,) = run["targets"]
    assert target["model"] == "esm2-tiny" and target["threshold"] == gpu_suite.BF16_OVER_STOCK
    assert target["target"] == "service forward, fast path (SDPA) bf16 / stock fair-esm fp32" and target["value"] > 0
    report = results.with_suffix(".md").read_text()
    assert "Targets checked in this run" in report and "peak against the start-up estimate" in report
    (served,) = [m for m in run["measurements"] if m["case"].startswith("service full path")]
    assert served["extra"]["device_memory_estimate_bytes"] > served["extra"]["device_memory_peak_bytes"] > 0


def test_an_unknown_model_is_refused_before_any_work(suite, tmp_path):
    with pytest.raises(SystemExit, match=r"--suite-models '650m,30b': unknown shape\(s\) 30b; choose from .*3b"):
        suite("--device", "cuda", "--suite-models", "650m,30b")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_without_cuda_the_suite_says_so_and_names_the_dry_run(suite, tmp_path):
    with pytest.raises(SystemExit, match=r"--device cuda: CUDA is not available.*--dry-run"):
        suite("--device", "cuda")
    assert not (tmp_path / "cache").exists()
