"""Every result says where it came from (issue 33): the weights fingerprint, cached beside the
checkpoint; ListModels, gRPC trailing metadata, the JSON API's headers (and score's body); the
files `esm2 embed` writes and refuses to mix; the PNGs of random weights; the demo's file name."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest
import requests
from support import REPO, body, encode_request, esm2, post, write_fasta

from esm2_client.embedding_store import EmbeddingStore, OutputError
from esm2_wire.proto import pb
from esm2_wire.provenance import HEADERS, Provenance
from service.models import fingerprint, sources
from service.models.checkpoints import load
from service.models.random_checkpoints import demo_stem, write_random_checkpoint


def _load(path: Path):
    return sources.load("m", sources.locate("m", str(path), None, allow_download=False))


# ---- the fingerprint --------------------------------------------------------------------
def test_fingerprint_hashes_the_state_dict_is_cached_beside_and_renewed_when_the_file_changes(tmp_path):
    path = write_random_checkpoint("tiny", tmp_path / "a", seed=1)
    first = _load(path).weights_fingerprint
    assert first == fingerprint.state_dict_fingerprint(load("m", path).model)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    # The weights, not the file: the same weights elsewhere have the same fingerprint, other weights another.
    assert _load(write_random_checkpoint("tiny", tmp_path / "b", seed=1)).weights_fingerprint == first
    assert _load(write_random_checkpoint("tiny", tmp_path / "c", seed=2)).weights_fingerprint != first

    cache = path.with_name(path.name + fingerprint.BESIDE_FILE_SUFFIX)
    entry = json.loads(cache.read_text())
    assert entry["fingerprint"] == first
    planted = "sha256:" + "f" * 64  # read back, not hashed again, while the files are unchanged
    cache.write_text(json.dumps({**entry, "fingerprint": planted}))
    assert _load(path).weights_fingerprint == planted
    # Rewritten in place (same name, same size, other weights): hashed again.
    write_random_checkpoint("tiny", tmp_path / "a", seed=2)
    renewed = _load(path).weights_fingerprint
    assert renewed == fingerprint.state_dict_fingerprint(load("m", path).model) != first
    assert json.loads(cache.read_text())["fingerprint"] == renewed


def _read_only(directories: list[Path]) -> list[str]:
    """A command prefix that runs with `directories` read-only: chmod for a user, a read-only bind
    mount in a private mount namespace for root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        for directory in directories:
            directory.chmod(0o555)
        return []
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("root without mount namespaces: no way to make a directory read-only here")
    mounts = " && ".join(f"mount --bind {d} {d} && mount -o remount,bind,ro {d}" for d in directories)
    return ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


@pytest.mark.parametrize("cache_writable", [True, False])
def test_read_only_checkpoint_directory_is_safe(tmp_path, cache_writable):
    """A container image's read-only weights: the cache goes to $XDG_CACHE_HOME, or nowhere; the
    fingerprint is the same either way and start-up does not fail."""
    weights, user_cache = tmp_path / "weights", tmp_path / "cache"
    user_cache.mkdir()
    path = write_random_checkpoint("tiny", weights, seed=1)
    prefix = _read_only([weights] + ([] if cache_writable else [user_cache]))
    script = "import sys; from service.models import sources; " \
             "print(sources.load('m', sources.locate('m', sys.argv[1], None, False)).weights_fingerprint)"
    run = subprocess.run([*prefix, sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(user_cache), "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == fingerprint.state_dict_fingerprint(load("m", path).model)
    assert not path.with_name(path.name + fingerprint.BESIDE_FILE_SUFFIX).exists()
    cached = list(user_cache.rglob("*.json"))
    assert len(cached) == (1 if cache_writable else 0)
    if cache_writable:
        assert json.loads(cached[0].read_text())["fingerprint"] == run.stdout.strip()


# ---- what the server sends --------------------------------------------------------------
@pytest.fixture
def tiny_provenance(stub, reference_models) -> Provenance:
    info = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    tiny = info["esm2-tiny"]
    assert tiny.weights_fingerprint == fingerprint.state_dict_fingerprint(reference_models["esm2-tiny"].model)
    assert tiny.server_version == importlib.metadata.version("esm2-service")
    assert tiny.random_weights and tiny.precision == "fp32"
    assert info["esm2-8m"].weights_fingerprint not in ("", tiny.weights_fingerprint)
    return Provenance.of_model_info(tiny)


def test_every_grpc_result_carries_provenance_in_trailing_metadata(stub, tiny_provenance):
    want = set(tiny_provenance.metadata())
    _, call = stub.Encode.with_call(encode_request("esm2-tiny", ["MKTAY"]))
    assert want <= set(call.trailing_metadata())
    _, call = stub.Predict.with_call(pb.PredictRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence="MK<mask>A")]))
    assert want <= set(call.trailing_metadata())
    _, call = stub.LogProb.with_call(pb.LogProbRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence="MKTAY")]))
    assert want <= set(call.trailing_metadata())
    _, call = stub.Score.with_call(pb.ScoreRequest(model="esm2-tiny", items=[pb.ScoreItem(sequence="MKTAY",
                                                                                           variants=["K2A"])]))
    assert want <= set(call.trailing_metadata())
    stream = stub.EncodeStream(pb.EncodeStreamRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence="MKTAY")]))
    list(stream)
    assert want <= set(stream.trailing_metadata())
    assert Provenance.of_metadata(stream.trailing_metadata()) == tiny_provenance


def test_every_json_result_carries_provenance_headers_and_score_its_body(gateway, tiny_provenance):
    requests_ = {
        "encode": body(["MKTAY"]),
        "predict": body(["MK<mask>AY"]),
        "log_prob": body(["MKTAY"]),
        "score": {"items": [{"sequence": "MKTAY", "variants": ["K2A"]}]},
    }
    for action, request in requests_.items():
        response = post(gateway, f"/api/v3/esm2-tiny/{action}", request)
        assert response.status_code == 200, response.text
        assert Provenance.of_metadata(response.headers) == tiny_provenance, action
        assert response.headers[HEADERS["random_weights"]] == "true"
        # BioLM's actions keep BioLM's body; score, our extension, carries it in the body too.
        want_keys = {"results", "provenance"} if action == "score" else {"results"}
        assert set(response.json()) == want_keys, action
    assert response.json()["provenance"] == tiny_provenance.as_dict()
    refused = post(gateway, "/api/v3/esm2-tiny/encode", body(["MK1"]))
    assert refused.status_code == 400 and HEADERS["weights_fingerprint"] not in refused.headers
    models = requests.get(gateway.url + "/api/v3/models", timeout=30).json()["models"]
    listed = next(m for m in models if m["name"] == "esm2-tiny")
    assert listed["weights_fingerprint"] == tiny_provenance.weights_fingerprint
    assert listed["server_version"] == tiny_provenance.server_version


# ---- what the CLI writes ------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_embed_files_carry_provenance_and_refuse_other_weights(server, tiny_provenance, tmp_path, suffix):
    fasta = write_fasta(tmp_path / "p.fasta", {"a": "MKTAY", "b": "MLKV"})
    out = tmp_path / f"out{suffix}"
    esm2("embed", fasta, "-o", out, "-m", "esm2-tiny", "--server", server.target)
    if suffix == ".h5":
        with h5py.File(out, "r") as f:
            found = {key: f.attrs[key] for key in HEADERS}
            assert found["weights_fingerprint"] == tiny_provenance.weights_fingerprint
            assert bool(found["random_weights"]) is True and found["model"] == "esm2-tiny"
            assert found["precision"] == "fp32" and found["server_version"] == tiny_provenance.server_version
    else:
        with np.load(out) as archive:
            assert json.loads(str(archive["__esm2_provenance__"])) == tiny_provenance.as_dict()
    # Same file, more sequences, other weights (esm2-8m, under the tiny model's settings otherwise): refused.
    write_fasta(fasta, {"a": "MKTAY", "b": "MLKV", "c": "MKKV"})
    refused = esm2("embed", fasta, "-o", out, "-m", "esm2-8m", "--server", server.target, check=False)
    assert refused.returncode == 1
    message = refused.stderr.strip()
    assert "was written with other settings" in message  # the model is part of the settings
    # The settings equal, the weights not: what a server restarted on another checkpoint looks like.
    settings_only = tmp_path / f"same{suffix}"
    settings = {"model": "esm2-tiny", "include": ["mean"], "repr_layers": [2], "truncate": None}
    store = EmbeddingStore(settings_only, settings, tiny_provenance.as_dict())
    store.open()
    store.add("a", {"mean/2": np.ones(4, np.float32)})
    store.publish()
    other = {**tiny_provenance.as_dict(), "weights_fingerprint": "sha256:" + "1" * 64, "random_weights": False}
    with pytest.raises(OutputError) as refusal:
        EmbeddingStore(settings_only, settings, other).open()
    text = str(refusal.value)
    assert f"holds outputs of weights {tiny_provenance.weights_fingerprint} (esm2-tiny, random weights)" in text
    assert "sha256:" + "1" * 64 in text and "mix outputs of different weights" in text
    assert f"delete {settings_only}" in text
    resumed = EmbeddingStore(settings_only, settings, tiny_provenance.as_dict())
    assert resumed.open() == {"a"}  # the same weights resume as before
    resumed.publish()


def test_contact_pngs_of_random_weights_say_so(server, tiny_provenance, tmp_path):
    from PIL import Image

    fasta = write_fasta(tmp_path / "p.fasta", {"p1": "MKTAYIAKQRQISFVKSHFSRQ"})
    esm2("contacts", fasta, "--png", tmp_path / "maps", "-m", "esm2-tiny", "--server", server.target)
    with Image.open(tmp_path / "maps" / "p1.png") as image:
        assert image.text["Title"] == "RANDOM WEIGHTS (meaningless): p1"
        assert json.loads(image.text["Description"]) == tiny_provenance.as_dict()


def test_demo_checkpoint_is_not_named_like_the_real_one(tmp_path):
    run = subprocess.run([sys.executable, "-m", "service.models.random_checkpoints", "--shape", "tiny", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "esm2-tiny-shape-RANDOM-WEIGHTS-contact-regression.pt", "esm2-tiny-shape-RANDOM-WEIGHTS.pt"]
    # make demo and make fleet write and serve the 8M-shape file under that name, never fair-esm's.
    for target in ("demo", "fleet"):
        plan = subprocess.run(["make", "-n", target, f"CHECKPOINTS={tmp_path}", "PY=python"], cwd=REPO,
                              capture_output=True, text=True, timeout=60).stdout
        assert f"--checkpoint esm2-8m={tmp_path}/{demo_stem('8m')}.pt" in plan, plan
        assert "esm2_t6_8M_UR50D" not in plan and "--model-dir" not in plan
