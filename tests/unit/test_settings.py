"""One declaration per setting (service.config): flags and ESM_* variables read from it, bounds
refused naming the setting, the models file's keys are its per-model subset, the JSON edge's
limits are declared once for server and gateway, and --help and the docs' settings tables come from it."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest

from gateway import envoy_config
from gateway.launch import LaunchSettings, server_commands
from service import config
from service.config import SETTINGS_PAGE as SETTINGS_PAGE_PATH
from service.config import JsonEdgeLimits, ModelSettings, ServerSettings, env_of, flag_of, markdown_table
from service.engine.faults import FaultHook
from service.server import parse_args

SETTINGS_PAGE = Path(__file__).resolve().parents[2] / SETTINGS_PAGE_PATH
DECLARATIONS = {"service.server": ServerSettings, "gateway.launch": LaunchSettings,
                "gateway.envoy_config": envoy_config.RenderSettings}


@pytest.fixture(autouse=True)
def no_esm_variables(monkeypatch):
    """Start from an environment without ESM_* settings, whatever the test runner has."""
    for name in [n for n in os.environ if n.startswith(config.ENV_PREFIX)]:
        monkeypatch.delenv(name)


def _refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


# ---- flags and variables ------------------------------------------------------------------

def test_a_flag_wins_over_its_variable_which_wins_over_the_default(monkeypatch):
    assert parse_args([]).port == 50051
    monkeypatch.setenv("ESM_PORT", "6001")
    assert parse_args([]).port == 6001
    assert parse_args(["--port", "6002"]).port == 6002
    monkeypatch.setenv("ESM_PORT", "")  # an empty variable is unset
    assert parse_args([]).port == 50051


def test_list_and_switch_settings_read_their_variables(monkeypatch):
    monkeypatch.setenv("ESM_MODELS", "a,b")
    monkeypatch.setenv("ESM_CHECKPOINTS", "a=/m/a.pt,b=/m/b.pt")
    monkeypatch.setenv("ESM_OFFLINE", "true")
    args = parse_args([])
    assert args.offline and [s.source for s in args.specs] == ["/m/a.pt", "/m/b.pt"]
    # Flags win as a whole: --checkpoint given replaces ESM_CHECKPOINTS, it does not add to it.
    args = parse_args(["--checkpoint", "a=/other/a.pt"])
    assert [s.source for s in args.specs] == ["/other/a.pt", None]
    monkeypatch.setenv("ESM_OFFLINE", "0")
    assert not parse_args([]).offline


def test_environment_only_settings_api_keys_and_fault_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ESM_API_KEYS", "sesame,open")
    monkeypatch.setenv("ESM_FAULT_FILE", str(tmp_path / "fault"))
    args = parse_args([])
    assert args.api_keys.get_secret_value() == "sesame,open" and "sesame" not in repr(args.api_keys)
    hook = FaultHook.armed(args.fault_file)
    assert hook is not None and hook.path == tmp_path / "fault"
    monkeypatch.delenv("ESM_FAULT_FILE")
    assert parse_args([]).fault_file is None and FaultHook.armed(None) is None
    flags = config.parser_for(ServerSettings)._option_string_actions
    assert "--api-keys" not in flags and "--fault-file" not in flags  # a key on a command line shows in `ps`


def test_flag_only_settings_ignore_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ESM_PORT_FILE", str(tmp_path / "from-env"))
    monkeypatch.setenv("ESM_SIMULATE_OOM_ABOVE_TOKENS", "5")
    args = parse_args([])
    assert args.port_file is None and args.simulate_oom_above_tokens == 0
    assert parse_args(["--port-file", str(tmp_path / "p")]).port_file == tmp_path / "p"


# ---- bounds -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,named", [
    (["--port", "70000"], "--port (ESM_PORT) = '70000': Input should be less than or equal to 65535"),
    (["--cache-mb", "-1"], "--cache-mb (ESM_CACHE_MB) = '-1': Input should be greater than or equal to 0"),
    (["--max-metadata-bytes", str(config.GRPC_METADATA_CEILING_BYTES + 1)], "--max-metadata-bytes (ESM_MAX_METADATA_BYTES)"),
    (["--max-batch-token-pairs", "0"], "--max-batch-token-pairs (ESM_MAX_BATCH_TOKEN_PAIRS) = '0': Input should be greater"),
    (["--min-padding-efficiency", "1.5"], "--min-padding-efficiency (ESM_MIN_PADDING_EFFICIENCY) = '1.5'"),
    (["--max-batch-tokens", "lots"], "--max-batch-tokens (ESM_MAX_BATCH_TOKENS) = 'lots': expected a number of tokens"),
    (["--precision", "fp8"], "--precision (ESM_PRECISION) = 'fp8': Input should be 'auto', 'fp32', 'fp16', 'bf16' or 'int8'"),
    (["--max-items", "x"], "--max-items (ESM_MAX_ITEMS) = 'x': Input should be a valid integer"),
])
def test_a_value_out_of_bounds_stops_start_up_naming_the_setting(capsys, argv, named):
    assert named in _refusal(capsys, argv)


def test_a_bad_variable_is_refused_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("ESM_AGING", "-1")
    assert "--aging (ESM_AGING) = '-1': Input should be greater than or equal to 0" in _refusal(capsys, [])


def test_the_gateway_refuses_out_of_bounds_values_too(capsys):
    with pytest.raises(SystemExit):
        envoy_config.main(["--retry-budget-percent", "101", "--pool", "a"])
    err = capsys.readouterr().err
    assert "--retry-budget-percent (ESM_RETRY_BUDGET_PERCENT) = '101'" in err
    assert "--pool (ESM_POOL) = ['a']: expected MODEL=HOST:PORT" in err


# ---- the per-model subset -----------------------------------------------------------------

def test_models_file_keys_are_the_per_model_settings():
    assert config.MODEL_KEYS == ("source", *ModelSettings.model_fields)
    for key in ModelSettings.model_fields:  # each is also a flag with a variable: every model's default
        assert ServerSettings.model_fields[key] is not None
        assert flag_of(key, ServerSettings.model_fields[key]) == "--" + key.replace("_", "-")


def test_every_per_model_setting_is_read_from_the_file_and_bounded_as_the_flag_is(tmp_path, capsys):
    values = {"device": '"cpu"', "precision": '"fp16"', "attention": '"exact"', "layout": '"packed"',
              "max_batch_tokens": "512",
              "max_batch_size": "3", "max_wait_ms": "7", "max_queue_items": "300", "max_queue_work": "123456",
              "min_padding_efficiency": "0.5", "max_batch_token_pairs": "9999", "aging": "1.5"}
    assert set(values) == set(ModelSettings.model_fields)
    models = tmp_path / "models.toml"
    models.write_text("[models.a]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    [spec] = parse_args(["--models-file", str(models)]).specs
    assert spec.model_dump(exclude={"name", "source"}) == {
        "device": "cpu", "precision": "fp16", "attention": "exact", "layout": "packed", "max_batch_tokens": "512", "max_batch_size": 3,
        "max_wait_ms": 7.0, "max_queue_items": 300, "max_queue_work": 123456, "min_padding_efficiency": 0.5, "max_batch_token_pairs": 9999,
        "aging": 1.5}
    for key, bad in [("max_wait_ms", "-1"), ("min_padding_efficiency", "2"), ("max_batch_size", "0"),
                     ("max_queue_work", "0")]:
        models.write_text(f"[models.a]\n{key} = {bad}\n")
        from_file = _refusal(capsys, ["--models-file", str(models)])
        from_flag = _refusal(capsys, ["--" + key.replace("_", "-"), bad])
        problem = re.search(r"Input should be [^;\n]*", from_flag).group(0)
        assert f"[models.a]: {key} = {bad}: {problem}" in from_file


# ---- shared with the gateway --------------------------------------------------------------

def test_the_json_edge_limits_are_declared_once_and_read_by_server_and_gateway(monkeypatch):
    shared = set(JsonEdgeLimits.model_fields)
    assert shared == {"max_json_response_mb", "max_request_bytes"}
    for cls in (ServerSettings, envoy_config.GatewaySettings, LaunchSettings, envoy_config.GatewayConfig):
        assert shared <= set(cls.model_fields) and issubclass(cls, JsonEdgeLimits)
        redeclared = [n for base in cls.__mro__ if base is not JsonEdgeLimits
                      for n in vars(base).get("__annotations__", {}) if n in shared]
        assert not redeclared, f"{cls.__name__} declares {redeclared} again"
    # One variable sets both sides, and the launcher hands the gateway's values to its servers.
    monkeypatch.setenv("ESM_MAX_REQUEST_BYTES", "123456")
    assert parse_args([]).max_request_bytes == 123456
    gateway = LaunchSettings()
    assert gateway.max_request_bytes == 123456
    [(_, _, argv, server_args)] = server_commands(["--port", "7000"], 1, 7, gateway.max_request_bytes)
    assert (server_args.max_json_response_mb, server_args.max_request_bytes) == (512, 123456)
    assert (parse_args(argv).max_json_response_mb, parse_args(argv).max_request_bytes) == (7, 123456)


# ---- --help and docs/configuration.md ------------------------------------------------------

@pytest.mark.parametrize("module", DECLARATIONS)
def test_help_lists_every_declared_setting(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    text = capsys.readouterr().out
    for name, info in DECLARATIONS[module].model_fields.items():
        hidden = info.json_schema_extra.get("hidden")
        for word in filter(None, (flag_of(name, info), env_of(name, info))):
            assert (word in text) != hidden, f"{word} {'shown' if hidden else 'missing'} in {module} --help"


@pytest.mark.parametrize("section,cls", [("server", ServerSettings), ("gateway", LaunchSettings)])
def test_the_docs_settings_tables_are_the_generated_ones(section, cls):
    text = SETTINGS_PAGE.read_text()
    found = re.search(rf"<!-- settings:{section} -->\n(.*?)<!-- /settings:{section} -->", text, re.S)
    assert found, f"{SETTINGS_PAGE_PATH} has no settings:{section} table"
    assert found.group(1) == markdown_table(cls), (
        f"{SETTINGS_PAGE_PATH}'s {section} settings differ from the declaration: regenerate with "
        f"`python -m service.config --write-doc {SETTINGS_PAGE_PATH}` (make settings-doc)")
