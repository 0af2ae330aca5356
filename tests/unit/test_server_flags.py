"""The server's flags default to the limits' own defaults, and override them one by one."""

from esm2_wire.vocabulary import Limits
from service.engine.scheduler import BatchLimits
from service.server import parse_args, request_limits


def test_no_flags_means_the_dataclass_defaults():
    args = parse_args([])
    assert request_limits(args) == Limits()
    [spec] = args.specs
    # The default layout (auto) runs a CPU's batches packed; everything else is the dataclass's.
    assert spec.batch_limits(BatchLimits().max_batch_tokens) == BatchLimits(packed=True)


def test_flags_and_environment_override_them(monkeypatch):
    monkeypatch.setenv("ESM_MAX_BATCH_SIZE", "16")
    args = parse_args(["--max-items", "4", "--max-wait-ms", "20", "--aging", "0",
                       "--max-batch-token-pairs", "1000000"])
    assert request_limits(args) == Limits(max_items=4)
    [spec] = args.specs
    assert spec.batch_limits(1024) == BatchLimits(max_batch_tokens=1024, max_batch_size=16, max_wait_s=0.02,
                                                         aging=0.0, max_batch_token_pairs=1000000, packed=True)


def test_a_models_file_sets_scheduling_per_model(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text('[models.a]\naging = 0\nmax_batch_token_pairs = 65536\nlayout = "padded"\n\n[models.b]\n')
    a, b = parse_args(["--models-file", str(models), "--aging", "8"]).specs
    assert a.batch_limits(1024) == BatchLimits(max_batch_tokens=1024, aging=0.0, max_batch_token_pairs=65536)
    assert b.batch_limits(1024) == BatchLimits(max_batch_tokens=1024, aging=8.0, packed=True)
