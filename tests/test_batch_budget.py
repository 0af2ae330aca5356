"""The batch token budget per model and device: the measured default, the start-up sweep and
the flag, reported in ListModels and the log, and what bounds the scheduler's batches."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from support import REPO
from service.config import parse_batch_tokens
from service import platforms
from service.models import batch_budget
from esm2_wire.proto import pb


def test_budget_choice_prefers_the_smallest_within_tolerance():
    assert batch_budget.choose({512: 90.0, 1024: 100.0, 2048: 102.0, 4096: 80.0}) == 1024
    assert batch_budget.choose({512: 50.0, 1024: 100.0}) == 1024
    assert parse_batch_tokens("device") == "device" and parse_batch_tokens("2048") == "2048"
    for bad in ("0", "-5", "lots"):
        with pytest.raises(ValueError):
            parse_batch_tokens(bad)


def test_sweep_measures_within_its_bounds(reference_models):
    loaded = reference_models["esm2-tiny"]
    choice = batch_budget.measure(loaded, platforms.of(torch.device("cpu")), None, None, seconds=30)
    assert choice.source == "measured at start-up"
    assert choice.tokens in choice.tokens_per_s and set(choice.tokens_per_s) <= set(batch_budget.CANDIDATES["cpu"])
    assert all(rate > 0 for rate in choice.tokens_per_s.values())
    # A zero time bound still measures the smallest candidate, then stops.
    assert list(batch_budget.measure(loaded, platforms.of(torch.device("cpu")), None, None, seconds=0).tokens_per_s) == [512]


def test_list_models_reports_budget_and_precision(stub):
    """The session server runs with defaults: the measured CPU default and fp32."""
    info = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    for name in ("esm2-tiny", "esm2-8m"):
        assert info[name].max_batch_tokens == batch_budget.DEVICE_DEFAULTS["cpu"]
        assert info[name].batch_tokens_source == "measured default for cpu"
        assert info[name].precision == "fp32"


@pytest.mark.slow
def test_flag_overrides_and_sweep_is_logged(server_factory, tiny):
    server = server_factory("--max-batch-tokens", "sweep", "--batch-sweep-seconds", "10", models=tiny)
    (info,) = server.stub.ListModels(pb.ListModelsRequest()).models
    log = server.log()
    assert info.batch_tokens_source == "measured at start-up"
    assert info.max_batch_tokens in batch_budget.CANDIDATES["cpu"]
    assert f"esm2-tiny: batch budget {info.max_batch_tokens} tokens (measured at start-up; one-layer tokens/s" in log

    server = server_factory("--max-batch-tokens", "3000", models=tiny)
    (info,) = server.stub.ListModels(pb.ListModelsRequest()).models
    assert (info.max_batch_tokens, info.batch_tokens_source) == (3000, "--max-batch-tokens")


def test_bad_budget_flag_is_a_clear_usage_error(tiny_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "service.server", "--max-batch-tokens", "lots"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--max-batch-tokens (ESM_MAX_BATCH_TOKENS) = 'lots': expected a number of tokens, 'device' or 'sweep'" in proc.stderr
