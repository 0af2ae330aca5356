"""Checkpoint discovery and safe loading, through the loader the server uses."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import esm
import pytest
import torch

from support import REPO
from reference import assert_close, reference
from service.models import checkpoints
from service.models.forward import BatchPlan, forward
from service.models.random_checkpoints import write_random_checkpoint


def test_random_checkpoints_are_in_fair_esm_format(tiny_checkpoint):
    """fair-esm's own loader reads them (trusted here: we just wrote the file)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(tiny_checkpoint))
    ours = checkpoints.load("esm2-tiny", tiny_checkpoint)
    assert ours.random_weights and ours.has_contact_regression
    for (name, a), (_, b) in zip(model.state_dict().items(), ours.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "shape,layers,dim,millions",
    [("8m", 6, 320, 7.5), ("35m", 12, 480, 33.5), ("150m", 30, 640, 148.1), ("650m", 33, 1280, 651.0)],
)
def test_real_shapes_load_and_run(tmp_path, shape, layers, dim, millions):
    path = write_random_checkpoint(shape, tmp_path)
    assert path.name == f"{checkpoints.STANDARD_MODELS[f'esm2-{shape}']}.pt"
    loaded = checkpoints.load(f"esm2-{shape}", path)
    assert (loaded.num_layers, loaded.embed_dim, loaded.attention_heads) == (layers, dim, 20)
    assert loaded.parameters / 1e6 == pytest.approx(millions, abs=0.1)
    # The service's forward on the loaded model equals fair-esm's own forward.
    sequence = "MKTAYIAKQRQISFVKSHFSRQ"
    tokens = torch.tensor([[loaded.alphabet.cls_idx, *map(loaded.alphabet.get_idx, sequence), loaded.alphabet.eos_idx]])
    ours = forward(loaded.model, tokens, BatchPlan(layers=frozenset({layers}))).representations[layers]
    assert_close(ours[0, 1:-1].mean(0), reference(loaded, sequence, layers=[layers])["mean"][layers])
    path.unlink()  # the 650M file is 2.6 GB


def test_lookup_order_explicit_then_model_dir_then_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    in_hub = write_random_checkpoint("8m", hub)
    assert checkpoints.locate("esm2-8m", None, tmp_path / "models", allow_download=False) == in_hub
    in_dir = write_random_checkpoint("8m", tmp_path / "models")
    assert checkpoints.locate("esm2-8m", None, tmp_path / "models", allow_download=False) == in_dir
    explicit = write_random_checkpoint("tiny", tmp_path / "elsewhere")
    assert checkpoints.locate("esm2-8m", explicit, tmp_path / "models", allow_download=False) == explicit


def test_missing_weights_name_every_place_looked(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run(
        [sys.executable, "-m", "service.server", "--models", "esm2-35m", "--model-dir", str(tmp_path / "models"),
         "--offline", "--port", "0", "--metrics-port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    for expected in (
        "no checkpoint for model 'esm2-35m'",
        str(tmp_path / "models" / "esm2_t12_35M_UR50D.pt"),
        str(tmp_path / "torch" / "hub" / "checkpoints" / "esm2_t12_35M_UR50D.pt"),
        "Downloading is switched off (--offline)",
        "esm2_t12_35M_UR50D-contact-regression.pt",
        "--checkpoint esm2-35m=",
        "Offline, to try the service: `make demo`",
    ):
        assert expected in result.stderr, expected
    assert "Traceback" not in result.stderr


def test_custom_model_name_needs_an_explicit_path(tmp_path):
    with pytest.raises(checkpoints.CheckpointNotFound, match="Pass --checkpoint esm2-mine=/path/to/checkpoint.pt"):
        checkpoints.locate("esm2-mine", None, tmp_path, allow_download=False)
    with pytest.raises(checkpoints.CheckpointNotFound, match=str(tmp_path / "nope.pt")):
        checkpoints.locate("esm2-mine", tmp_path / "nope.pt", None, allow_download=False)


class Payload:
    """Unpickling this would run code: the loader must refuse it."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PAYLOAD_MARKER"]),))


def test_untrusted_pickles_are_refused(tmp_path, tiny_checkpoint, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    data = torch.load(tiny_checkpoint, weights_only=False)
    data["cfg"]["extra"] = Payload()
    bad = tmp_path / "esm2_t2_bad.pt"
    torch.save(data, bad)
    with pytest.raises(RuntimeError, match="could not load checkpoint .*esm2_t2_bad.pt"):
        checkpoints.load("esm2-bad", bad)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "esm2_weights.pt"
    torch.save({"state": torch.zeros(2)}, path)
    with pytest.raises(RuntimeError, match="is not a fair-esm ESM-2 checkpoint"):
        checkpoints.load("esm2-x", path)
