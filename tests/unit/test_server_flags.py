"""The server's flags default to the limits' own defaults, and override them one by one."""

from esm2_wire.vocabulary import Limits
from service.scheduler import BatchLimits
from service.server import limits_from, parse_args


def test_no_flags_means_the_dataclass_defaults():
    assert limits_from(parse_args([])) == (Limits(), BatchLimits())


def test_flags_and_environment_override_them(monkeypatch):
    monkeypatch.setenv("ESM_MAX_BATCH_SIZE", "16")
    limits, batching = limits_from(parse_args(["--max-items", "4", "--max-wait-ms", "20"]))
    assert limits == Limits(max_items=4)
    assert batching == BatchLimits(max_batch_size=16, max_wait_s=0.02)
