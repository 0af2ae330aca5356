"""The models file and the flags: per-model settings, defaults, and the errors that stop start-up."""

import pytest

from service import server
from service.model_specs import ModelSpec


def _specs(*argv):
    return server.parse_args(list(argv)).specs


def test_file_settings_override_the_flags_which_are_the_defaults(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text("""
[models.esm2-8m]
device = "cpu"

[models.esm2-ft]
source = "hf:my-org/esm2-650m-ft@v2"
device = "cuda:0"
precision = "bf16"
max_batch_tokens = 16384
aging = 0
max_batch_token_pairs = 1000000
""")
    specs = _specs("--models-file", str(models), "--max-batch-size", "16", "--precision", "fp16", "--aging", "2")
    assert specs == [
        ModelSpec(name="esm2-8m", device="cpu", precision="fp16", max_batch_size=16, aging=2.0),
        ModelSpec(name="esm2-ft", source="hf:my-org/esm2-650m-ft@v2", device="cuda:0", precision="bf16",
                  max_batch_tokens="16384", max_batch_size=16, max_batch_token_pairs=1000000, aging=0),
    ]


def test_flags_alone_describe_the_one_or_several_models(monkeypatch):
    assert _specs() == [ModelSpec(name="esm2-8m")]
    monkeypatch.setenv("ESM_MODELS", "a,b")
    monkeypatch.setenv("ESM_CHECKPOINTS", "a=/m/a.pt,b=hf:org/b")
    assert [(s.name, s.source, s.device) for s in _specs("--device", "cpu")] == [
        ("a", "/m/a.pt", "cpu"), ("b", "hf:org/b", "cpu")]


@pytest.mark.parametrize("text,message", [
    ('[models.a]\nsorce = "x"\n', "[models.a]: unknown keys sorce (known: source, device,"),
    ('[models.a]\nmax_batch_tokens = "big"\n', "[models.a]: max_batch_tokens = 'big': expected a number of tokens, 'device' or 'sweep', not 'big'"),
    ('[models.a]\nmax_batch_tokens = 1.5\n', "[models.a]: max_batch_tokens = 1.5: has the wrong type"),
    ('[models.a]\nmax_batch_size = "8"\n', "[models.a]: max_batch_size = '8': Input should be a valid integer"),
    ('[models.a]\nmax_wait_ms = true\n', "[models.a]: max_wait_ms = True: Input should be a valid number"),
    ('[models.a]\nprecision = "fp8"\n', "[models.a]: precision = 'fp8': Input should be 'auto', 'fp32', 'fp16', 'bf16' or 'int8'"),
    ('[models.a]\naging = -1\n', "[models.a]: aging = -1: Input should be greater than or equal to 0"),
    ('[models.a]\nmax_batch_token_pairs = 0\n',
     "[models.a]: max_batch_token_pairs = 0: Input should be greater than or equal to 1"),
    ('[models.a]\nmax_queue_items = 2\n', "max_queue_items must be at least --max-items (8) for a"),
    ('[server]\nport = 1\n', "expected only [models.<name>] tables (unknown: server)"),
    ('[models.a\n', "models file"),
])
def test_bad_models_files_stop_start_up_naming_the_problem(tmp_path, capsys, text, message):
    models = tmp_path / "models.toml"
    models.write_text(text)
    with pytest.raises(SystemExit):
        _specs("--models-file", str(models))
    assert message in capsys.readouterr().err


def test_models_file_excludes_models_and_checkpoint_flags(tmp_path, capsys):
    models = tmp_path / "models.toml"
    models.write_text("[models.a]\n")
    with pytest.raises(SystemExit):
        _specs("--models-file", str(models), "--models", "a")
    assert "--models-file names the models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _specs("--checkpoint", "a")
    assert "--checkpoint 'a': expected NAME=SOURCE" in capsys.readouterr().err
