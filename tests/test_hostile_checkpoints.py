"""Malformed checkpoints stop start-up cleanly (issue 16, attacks 8, 9 and 11).

Every file here is written in its real format (torch.save, safetensors, JSON) and read by
`python -m service.server`: a malformed one must stop start-up with exit status 2 and one log
line naming the file, the key and the problem, never a traceback, and never torch's advice to
load with weights_only=False. Index shards must stay inside the checkpoint directory. A
symlinked .pt finds its contact-regression file beside its target too, and says which it used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hf_models import write_random_hf
from safetensors.torch import load_file, save_file
from reference import assert_close
from support import REPO, ServerProcess, encode_request

from service.models import sources
from service.models.checkpoints import regression_path, safe_load
from service.models.hf_checkpoints import ALPHABET

# A tiny ESM-2 in Hugging Face's config format: the shapes the checks read before any weights.
HF_CONFIG = {
    "model_type": "esm", "architectures": ["EsmForMaskedLM"], "vocab_size": len(ALPHABET.all_toks),
    "pad_token_id": ALPHABET.padding_idx, "mask_token_id": ALPHABET.mask_idx, "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
    "position_embedding_type": "rotary", "token_dropout": True, "layer_norm_eps": 1e-5,
}


class Payload:
    """Unpickling this would run code; the restricted unpickler refuses it."""

    def __reduce__(self):
        return (os.system, ("true",))


def refusal(tmp_path: Path, *argv: str) -> str:
    """Start the server; assert it stopped with status 2 and one clean error line; return that line."""
    result = subprocess.run(
        [sys.executable, "-m", "service.server", "--offline", "--port", "0", "--metrics-port", "0", *argv],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")},
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert "weights_only=False" not in result.stderr and "will likely succeed" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-4000:]
    return errors[0]


# ---- fair-esm .pt files ---------------------------------------------------------------------
def fair_esm_copy(tiny_checkpoint: Path, directory: Path, change) -> Path:
    """The tiny checkpoint (and its regression file) with `change(data)` applied, saved by torch."""
    directory.mkdir()
    data = safe_load(tiny_checkpoint)
    data = {**data, "cfg": {"model": argparse.Namespace(**vars(data["cfg"]["model"]))}, "model": dict(data["model"])}
    data = change(data) or data
    path = directory / "esm2_t2_mine.pt"
    torch.save(data, path)
    regression_path(path).write_bytes(regression_path(tiny_checkpoint).read_bytes())
    return path


def set_cfg(key, value):
    def change(data):
        setattr(data["cfg"]["model"], key, value)
    return change


def set_weight(key, value):
    def change(data):
        data["model"][key] = value
    return change


FAIR_ESM_CASES = {
    "string-layers": (set_cfg("encoder_layers", "2"), "cfg.model.encoder_layers: is '2' (str); expected a positive integer"),
    "float-layers": (set_cfg("encoder_layers", 2.0), "cfg.model.encoder_layers: is 2.0 (float); expected a positive integer"),
    "negative-layers": (set_cfg("encoder_layers", -2), "cfg.model.encoder_layers: is -2; expected a positive integer"),
    "zero-heads": (set_cfg("encoder_attention_heads", 0), "cfg.model.encoder_attention_heads: is 0; expected a positive integer"),
    "boolean-size": (set_cfg("encoder_embed_dim", True), "cfg.model.encoder_embed_dim: is True (bool); expected a positive integer"),
    "odd-head-size": (set_cfg("encoder_attention_heads", 64),
                      "cfg.model.encoder_embed_dim: 64 / cfg.model.encoder_attention_heads 64 = 1 per head; rotary positions need an even head size"),
    "width-not-multiple": (set_cfg("encoder_attention_heads", 5),
                           "cfg.model.encoder_embed_dim: 64 is not a multiple of cfg.model.encoder_attention_heads 5"),
    "no-token-dropout": (lambda data: delattr(data["cfg"]["model"], "token_dropout"),
                         "cfg.model.token_dropout: is None; expected true or false"),
    "config-not-namespace": (lambda data: {**data, "cfg": {"model": {"encoder_layers": 2}}},
                             "cfg.model: is dict; expected fair-esm's argparse.Namespace"),
    "not-a-tensor": (set_weight("encoder.sentence_encoder.layers.0.fc1.weight", [1.0, 2.0]),
                     "model['encoder.sentence_encoder.layers.0.fc1.weight']: is list; expected a tensor"),
    "wrong-shape": (set_weight("encoder.sentence_encoder.layers.0.fc1.weight", torch.zeros(3, 3)),
                    "the weights do not fit the config: Error(s) in loading state_dict for ESM2: size mismatch for "
                    "layers.0.fc1.weight: copying a param with shape torch.Size([3, 3])"),
    "no-weights": (lambda data: {"cfg": data["cfg"]}, "is not a fair-esm ESM-2 checkpoint (no 'cfg'/'model' entries)"),
}


@pytest.mark.parametrize("case", sorted(FAIR_ESM_CASES))
def test_malformed_fair_esm_checkpoint_stops_start_up_with_one_line(tmp_path, tiny_checkpoint, case):
    change, problem = FAIR_ESM_CASES[case]
    path = fair_esm_copy(tiny_checkpoint, tmp_path / "model", change)
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={path}")
    assert str(path) in line and problem in line


def test_pickle_the_restricted_unpickler_refuses_names_the_global_not_the_advice(tmp_path, tiny_checkpoint):
    path = fair_esm_copy(tiny_checkpoint, tmp_path / "model", set_cfg("extra", Payload()))
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={path}")
    assert f"could not load checkpoint {path}: Trying to load unsupported GLOBAL posix.system" in line


@pytest.mark.parametrize("contents", [b"", b"PK\x03\x04 not really a zip" * 10, b"\x80\x02}q\x00."])
def test_not_a_torch_file(tmp_path, contents):
    path = tmp_path / "esm2_t2_mine.pt"
    path.write_bytes(contents)
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={path}")
    assert f"could not load checkpoint {path}" in line or f"{path} is not a fair-esm ESM-2 checkpoint" in line


def test_malformed_regression_file_is_named(tmp_path, tiny_checkpoint):
    path = fair_esm_copy(tiny_checkpoint, tmp_path / "model", lambda data: None)
    torch.save({"model": {"contact_head.regression.weight": "heavy"}}, regression_path(path))
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={path}")
    assert f"{regression_path(path)}: model['contact_head.regression.weight']: is str; expected a tensor" in line


# ---- Hugging Face directories ---------------------------------------------------------------
def hf_directory(directory: Path, **config) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**HF_CONFIG, **config}))
    return directory


HF_CONFIG_CASES = {
    "string-layers": ({"num_hidden_layers": "2"}, "num_hidden_layers: is '2' (str); expected a positive integer"),
    "float-layers": ({"num_hidden_layers": 2.5}, "num_hidden_layers: is 2.5 (float); expected a positive integer"),
    "negative-layers": ({"num_hidden_layers": -1}, "num_hidden_layers: is -1; expected a positive integer"),
    "zero-heads": ({"num_attention_heads": 0}, "num_attention_heads: is 0; expected a positive integer"),
    "boolean-size": ({"hidden_size": True}, "hidden_size: is True (bool); expected a positive integer"),
    "string-eps": ({"layer_norm_eps": "small"}, "layer_norm_eps is 'small', expected a positive number"),
    "string-dropout": ({"token_dropout": "yes"}, "token_dropout is 'yes', expected true or false"),
}


@pytest.mark.parametrize("case", sorted(HF_CONFIG_CASES))
def test_malformed_hf_config_stops_start_up_with_one_line(tmp_path, case):
    change, problem = HF_CONFIG_CASES[case]
    directory = hf_directory(tmp_path / "hf", **change)
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={directory}")
    assert str(directory / "config.json") in line and problem in line


def test_hf_config_that_is_not_an_object(tmp_path):
    directory = hf_directory(tmp_path / "hf")
    (directory / "config.json").write_text("[1, 2, 3]")
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={directory}")
    assert f"{directory / 'config.json'}: is a JSON list; expected an object of settings" in line


def test_bad_safetensors_file_is_named(tmp_path):
    directory = hf_directory(tmp_path / "hf")
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={directory}")
    assert f"{directory / 'model.safetensors'}: not a readable safetensors file" in line


def test_refused_bin_pickle_gives_no_advice(tmp_path):
    directory = hf_directory(tmp_path / "hf")
    torch.save({"esm.embeddings.word_embeddings.weight": torch.zeros(33, 64), "evil": Payload()},
               directory / "pytorch_model.bin")
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={directory}")
    assert f"could not load {directory / 'pytorch_model.bin'} with weights_only=True: Trying to load unsupported GLOBAL" in line


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_index_shards_outside_the_directory_are_refused(tmp_path, where):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"esm.embeddings.word_embeddings.weight": torch.zeros(33, 64)}, outside)
    directory = hf_directory(tmp_path / "hf")
    shard = str(outside) if where == "absolute" else "../elsewhere.safetensors"
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"esm.embeddings.word_embeddings.weight": shard}}))
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={directory}")
    assert (f"{index}: weight_map['esm.embeddings.word_embeddings.weight']: shard {shard!r} is outside the "
            "checkpoint directory") in line


def test_malformed_index_is_named(tmp_path):
    directory = hf_directory(tmp_path / "hf")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"esm.embeddings.word_embeddings.weight": 7}}))
    line = refusal(tmp_path, "--models", "mine", "--checkpoint", f"mine={directory}")
    assert f"{index}: weight_map['esm.embeddings.word_embeddings.weight']: 7 is not a file name" in line


# ---- a symlinked .pt ------------------------------------------------------------------------
def test_symlinked_checkpoint_finds_its_regression_file_beside_the_target(tmp_path, server, tiny_checkpoint):
    """Contacts from a link equal those of the file it points to (served by the session server)."""
    link = tmp_path / "links" / "esm2_t2_linked.pt"
    link.parent.mkdir()
    link.symlink_to(tiny_checkpoint)
    assert not regression_path(link).exists()
    with ServerProcess(tmp_path, "--models", "linked", "--checkpoint", f"linked={link}").wait_ready() as linked:
        assert f"linked: contact regression weights from {regression_path(tiny_checkpoint)}" in linked.log()
        request = encode_request("linked", ["MKTAYIAKQRQISFVKSHFSRQ"], ["contacts"])
        got = linked.stub.Encode(request, timeout=60).results[0].contacts
        request.model = "esm2-tiny"
        want = server.stub.Encode(request, timeout=60).results[0].contacts
        assert got.rows == want.rows == 22
        # Equal within the batch-invariance tolerance (the session server may batch it with others);
        # another regression file would give contacts far outside it.
        assert_close(got.values, want.values, "contacts through the link")


def test_symlinked_checkpoint_without_any_regression_file_names_both_places(tmp_path, tiny_checkpoint):
    target = tmp_path / "store" / "blob.pt"
    target.parent.mkdir()
    target.write_bytes(tiny_checkpoint.read_bytes())
    link = tmp_path / "esm2_t2_linked.pt"
    link.symlink_to(target)
    with ServerProcess(tmp_path, "--models", "linked", "--checkpoint", f"linked={link}").wait_ready() as linked:
        assert f"looked for {regression_path(link)} and {regression_path(target)}" in linked.log()
        with pytest.raises(grpc.RpcError) as info:
            linked.stub.Encode(encode_request("linked", ["MKT"], ["contacts"]), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("esm2_t2_linked-contact-regression.pt or blob-contact-regression.pt was not found"
                in info.value.details())


def test_index_shards_inside_the_directory_load_as_one_file_does(tmp_path):
    """The shard check refuses only what leaves the directory: a sharded save, one shard in a
    subdirectory, loads the same tensors as the single file it was cut from."""
    whole = write_random_hf("tiny", tmp_path / "whole")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "vocab.txt"):
        (sharded / name).write_bytes((whole / name).read_bytes())
    tensors = load_file(whole / "model.safetensors")
    names = sorted(tensors)
    halves = {"weights/part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    (sharded / "weights").mkdir()
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, sharded / shard)
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = sources.load("m", sources.locate("m", str(sharded), None, False)).model.state_dict()
    want = sources.load("m", sources.locate("m", str(whole), None, False)).model.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
