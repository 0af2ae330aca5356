"""Hugging Face checkpoints (save_pretrained directories and the HF cache by repo id),
several models from one models file, and the start-up refusals.

Ground truth is transformers' own EsmForMaskedLM forward of each sequence alone.
"""

import json
import logging
import os
import subprocess
import sys

import grpc
import pytest
import torch
from hf_models import (
    HF_SHAPES, convert_fair_esm, esm2_config, hf_reference, load_reference, make_hf_cache, save, write_random_hf,
)
from reference import INCLUDE_ALL, SEQUENCES, assert_close, check_result, matrix
from safetensors.torch import load_file, save_file
from transformers import EsmForSequenceClassification, EsmModel

from support import REPO, encode_request, free_port, start_server
from service.models import hf_checkpoints, sources
from service import server
from service.models.checkpoints import CheckpointNotFound
from service.models.forward import BatchPlan, forward
from service.models.memory_budget import DoesNotFit, parameter_count
from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb

REPO_ID = "my-org/esm2-tiny-ft"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tiny_checkpoint, reference_models):
    root = tmp_path_factory.mktemp("hf")
    tiny = write_random_hf("tiny", root / "tiny", seed=5)
    config = json.loads((tiny / "config.json").read_text())
    config["_name_or_path"] = "facebook/esm2_t6_8M_UR50D"  # as transformers 4 saved fine-tunes
    (tiny / "config.json").write_text(json.dumps(config))
    no_contacts = write_random_hf("tiny", root / "no-contacts", seed=6)
    weights = load_file(no_contacts / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "contact_head" not in k}, no_contacts / "model.safetensors",
              metadata={"format": "pt"})
    classifier = write_random_hf("tiny", root / "classifier", seed=7, model_class=EsmForSequenceClassification)
    (classifier / "README.md").write_text("---\nbase_model: facebook/esm2_t12_35M_UR50D\n---\n# fine-tuned\n")
    return {
        "tiny": tiny,
        "8m": write_random_hf("8m", root / "8m", seed=8),
        "no-contacts": no_contacts,
        "classifier": classifier,
        "converted": convert_fair_esm(reference_models["esm2-tiny"], root / "converted"),
        "hf_home": root / "hf_home",
    }


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory, hf_dirs, tiny_checkpoint):
    """One server, one models file: fair-esm and HF models side by side, each with its own budget."""
    make_hf_cache(hf_dirs["hf_home"], REPO_ID, hf_dirs["tiny"])
    models_file = tmp_path_factory.mktemp("models") / "models.toml"
    models_file.write_text(f"""
[models.fair-tiny]
source = "{tiny_checkpoint}"
device = "cpu"

[models.converted-tiny]
source = "{hf_dirs['converted']}"
max_batch_tokens = 300
max_batch_size = 2

[models.hub-tiny]
source = "hf:{REPO_ID}"

[models.hf-8m]
source = "{hf_dirs['8m']}"
attention = "exact"

[models.no-contacts]
source = "{hf_dirs['no-contacts']}"

[models.classifier]
source = "{hf_dirs['classifier']}"
""")
    with start_server(tmp_path_factory.mktemp("hf-server"), "--models-file", str(models_file),
                      env={"HF_HOME": str(hf_dirs["hf_home"]), "HF_HUB_CACHE": str(hf_dirs["hf_home"] / "hub")}) as proc:
        yield proc


@pytest.mark.parametrize("model,directory", [("hub-tiny", "tiny"), ("hf-8m", "8m")])
def test_served_outputs_equal_transformers(hf_server, hf_dirs, model, directory):
    reference_model = load_reference(hf_dirs[directory])
    response = hf_server.stub.Encode(encode_request(model, SEQUENCES, INCLUDE_ALL, [-1, 0, 1]))
    n = reference_model.config.num_hidden_layers
    for sequence, result in zip(SEQUENCES, response.results):
        check_result(result, hf_reference(reference_model, sequence), [n, 0, 1], INCLUDE_ALL)


@pytest.mark.parametrize("shape", ["tiny", "8m", "35m"])
def test_loader_matches_transformers_at_real_shapes(tmp_path, shape):
    """In-process, both attention paths, every layer: the conversion is exact at every shape."""
    directory = write_random_hf(shape, tmp_path / shape, seed=11)
    loaded = sources.load("x", sources.locate("x", str(directory), None, False))
    layers, dim, heads = HF_SHAPES[shape]
    assert (loaded.num_layers, loaded.embed_dim, loaded.attention_heads) == (layers, dim, heads)
    assert loaded.parameters == parameter_count(layers, dim, heads)
    a = loaded.alphabet  # a masked position exercises token dropout's rescaling
    tokens = torch.tensor([[a.cls_idx, *map(a.get_idx, "MKTAYIAKQRQISF"), a.mask_idx, *map(a.get_idx, "VKSHF"), a.eos_idx]])
    with torch.no_grad():
        hf_model = load_reference(directory)
        out = hf_model(tokens, output_hidden_states=True, output_attentions=True)
        last = hf_model.esm(tokens).last_hidden_state
    for fast in (True, False):
        outputs = {OutputKind.LOGITS} | (set() if fast else {OutputKind.ATTENTIONS})
        ours = forward(loaded.model, tokens, BatchPlan(frozenset(range(layers + 1)), frozenset(outputs), fast))
        for k in range(layers):
            assert_close(ours.representations[k], out.hidden_states[k], f"{shape} layer {k} fast={fast}")
        assert_close(ours.representations[layers], last, f"{shape} last layer")
        columns = [a.get_idx(c) for c in "LAGVSERTIDPKQNFYMHWC"]
        assert_close(ours.logits, out.logits[..., columns], f"{shape} logits")


def test_fair_esm_and_converted_hf_serve_the_same_outputs(hf_server):
    """The same weights in both formats, through one models file: equal outputs, each model's own budget."""
    stub = hf_server.stub
    fair = stub.Encode(encode_request("fair-tiny", SEQUENCES, INCLUDE_ALL, [-1, 0, 1]))
    hf = stub.Encode(encode_request("converted-tiny", SEQUENCES, INCLUDE_ALL, [-1, 0, 1]))
    for a, b in zip(fair.results, hf.results):
        for x, y in zip(a.per_token_embeddings, b.per_token_embeddings):
            assert_close(matrix(y.embeddings), matrix(x.embeddings), f"per_token {x.layer}")
        for x, y in zip(a.embeddings, b.embeddings):
            assert_close(y.embedding, x.embedding, f"mean {x.layer}")
        for key in ("logits", "contacts", "attentions"):
            assert_close(matrix(getattr(b, key)), matrix(getattr(a, key)), key)
    predicted = stub.Predict(pb.PredictRequest(model="converted-tiny", items=[pb.SequenceItem(sequence="MK<mask>AY")]))
    assert predicted.results[0].logits.rows == 5


def test_list_models_reports_format_and_origin_without_paths(hf_server, hf_dirs, tiny_checkpoint):
    models = {m.name: m for m in hf_server.stub.ListModels(pb.ListModelsRequest()).models}
    assert sorted(models) == ["classifier", "converted-tiny", "fair-tiny", "hf-8m", "hub-tiny", "no-contacts"]
    assert models["fair-tiny"].source_format == pb.ModelInfo.SOURCE_FORMAT_FAIR_ESM
    assert models["fair-tiny"].checkpoint == tiny_checkpoint.name
    hub = models["hub-tiny"]
    assert (hub.source_format, hub.checkpoint, hub.finetuned_from) == (
        pb.ModelInfo.SOURCE_FORMAT_HUGGING_FACE, REPO_ID, "facebook/esm2_t6_8M_UR50D")
    assert hub.random_weights and hub.device == "cpu" and hub.ready
    assert models["converted-tiny"].checkpoint == "converted"
    assert models["classifier"].finetuned_from == "facebook/esm2_t12_35M_UR50D"
    for m in models.values():
        assert "/" not in m.checkpoint or m.checkpoint == REPO_ID
        assert str(hf_dirs["tiny"].parent) not in str(m)
    log = hf_server.log()
    assert "MODEL hub-tiny HAS RANDOM WEIGHTS" in log
    assert "ignoring 4 tensors of heads the service does not serve (classifier)" in log


def test_outputs_a_checkpoint_lacks_are_refused_per_request(hf_server):
    stub = hf_server.stub
    assert stub.Encode(encode_request("classifier", ["MKT"], ["mean", "contacts"])).results[0].embeddings
    for call in (lambda: stub.Encode(encode_request("classifier", ["MKT"], ["logits"])),
                 lambda: stub.Predict(pb.PredictRequest(model="classifier", items=[pb.SequenceItem(sequence="M<mask>")]))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model classifier has no masked-LM head" in info.value.details()
    assert stub.Encode(encode_request("no-contacts", ["MKT"], ["logits"])).results[0].HasField("logits")
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(encode_request("no-contacts", ["MKT"], ["contacts"]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no-contacts has no contact-head weights" in info.value.details()


def _load(tmp_path, *argv):
    return server.load_models(server.parse_args(["--offline", *argv]))


@pytest.mark.parametrize("change,message", [
    ({"position_embedding_type": "absolute"}, "position_embedding_type is 'absolute', expected 'rotary'"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "architecture 'BertForMaskedLM' is not one of"),
    ({"vocab_size": 40}, "vocab_size is 40, expected 33"),
    ({"intermediate_size": 100}, "intermediate_size is 100, expected 256"),
    ({"emb_layer_norm_before": True}, "emb_layer_norm_before is True, expected False"),
])
def test_unservable_configs_are_refused(tmp_path, hf_dirs, change, message):
    directory = tmp_path / "model"
    directory.mkdir()
    for f in hf_dirs["tiny"].iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(hf_checkpoints.UnservableModel, match="cannot be served exactly") as info:
        _load(tmp_path, "--models", "m", "--checkpoint", f"m={directory}")
    assert message in str(info.value)


def test_missing_and_mismatched_files_are_refused(tmp_path, hf_dirs):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_bytes((hf_dirs["tiny"] / "config.json").read_bytes())
    with pytest.raises(hf_checkpoints.UnservableModel, match="has no weights: looked for model.safetensors"):
        _load(tmp_path, "--models", "m", "--checkpoint", f"m={directory}")
    weights = load_file(hf_dirs["tiny"] / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layer.1.output" not in k}, directory / "model.safetensors")
    with pytest.raises(hf_checkpoints.UnservableModel, match="lacks tensors an ESM-2 encoder needs: layers.1.fc2.bias"):
        _load(tmp_path, "--models", "m", "--checkpoint", f"m={directory}")
    (directory / "vocab.txt").write_text("<pad>\n<cls>\n")
    with pytest.raises(hf_checkpoints.UnservableModel, match="vocabulary differs from ESM-2's"):
        _load(tmp_path, "--models", "m", "--checkpoint", f"m={directory}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFound, match="is a directory without config.json"):
        _load(tmp_path, "--models", "m", "--checkpoint", f"m={tmp_path / 'empty'}")


def test_bin_weights_load_only_through_weights_only(tmp_path, hf_dirs):
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in ("config.json", "vocab.txt"):
        (directory / name).write_bytes((hf_dirs["tiny"] / name).read_bytes())
    weights = load_file(hf_dirs["tiny"] / "model.safetensors")
    torch.save(weights, directory / "pytorch_model.bin")
    served = _load(tmp_path, "--models", "m", "--checkpoint", f"m={directory}")
    from_safetensors = sources.load("m", sources.locate("m", str(hf_dirs["tiny"]), None, False))
    for (name, a), b in zip(served["m"].loaded.model.state_dict().items(), from_safetensors.model.state_dict().values()):
        assert torch.equal(a, b), name
    torch.save({"weights": weights, "evil": Exception("not a tensor")}, directory / "pytorch_model.bin")
    with pytest.raises(hf_checkpoints.UnservableModel, match="could not load .*pytorch_model.bin with weights_only=True"):
        _load(tmp_path, "--models", "m", "--checkpoint", f"m={directory}")


def test_hub_id_absent_offline_names_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointNotFound) as info:
        sources.locate("ft", "hf:my-org/absent", None, allow_download=False)
    message = str(info.value)
    assert str(tmp_path / "hub" / "models--my-org--absent" / "snapshots") in message
    assert "Downloading is switched off (--offline)" in message and "--checkpoint ft=" in message


def test_too_big_for_the_device_is_refused_before_download(tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "ESM_ASSUME_AVAILABLE_MEMORY_GIB": "24"}
    result = subprocess.run(
        [sys.executable, "-m", "service.server", "--models", "esm2-8m,esm2-15b", "--device", "cpu",
         "--port", "0", "--metrics-port", "0"],  # not --offline: the refusal must come before any download
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "cpu has 24.00 GiB available but needs 64.18 GiB" in result.stderr
    assert "esm2-15b (15,129.1M parameters: 61.94 GiB)" in result.stderr
    assert "Traceback" not in result.stderr and "downloading" not in result.stderr


def test_models_on_one_device_are_summed(tmp_path, tiny_checkpoint):
    # Each fits alone (0.12 GiB with the per-layer representations and 7 map buffers counted); together they do not.
    expected = r"cpu has 0.15 GiB available but needs 0.24 GiB for a \(0.1M parameters: 0.12 GiB\), b \("
    with pytest.raises(DoesNotFit, match=expected):
        _load(tmp_path, "--models", "a,b", "--checkpoint", f"a={tiny_checkpoint}", "--checkpoint", f"b={tiny_checkpoint}",
              "--assume-available-memory-gib", "0.15", "--max-sequence-length", "100", "--max-batch-tokens", "32768")


def test_hub_id_absent_online_tries_huggingface_hub_and_says_why_it_failed(tmp_path, monkeypatch):
    """Not offline: huggingface_hub is asked (here a closed port on 127.0.0.1, never the internet)."""
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", closed)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointNotFound) as info:
        sources.locate("ft", "hf:my-org/absent", None, allow_download=True)
    message = str(info.value)
    assert "Download from the Hugging Face hub failed" in message and "Connection refused" in message
    assert str(tmp_path / "hub" / "models--my-org--absent" / "snapshots") in message


def test_bare_esm_model_serves_embeddings_without_lm_head(tmp_path, caplog):
    """An EsmModel save (no `esm.` prefix, a pooler, no LM head): embeddings exact, logits refused."""
    caplog.set_level(logging.INFO, "service.models.hf_checkpoints")
    torch.manual_seed(3)
    bare = EsmModel(esm2_config(*HF_SHAPES["tiny"])).eval()
    directory = save(bare, tmp_path / "bare")
    loaded = sources.load("bare", sources.locate("bare", str(directory), None, False))
    assert not loaded.has_lm_head and loaded.has_contact_regression
    assert "ignoring 2 tensors of heads the service does not serve (esm.pooler)" in caplog.text
    a = loaded.alphabet
    tokens = torch.tensor([[a.cls_idx, *map(a.get_idx, "MKTAYIAKQR"), a.eos_idx]])
    ours = forward(loaded.model, tokens, BatchPlan(frozenset({2}), frozenset({OutputKind.CONTACTS}), False))
    bare = EsmModel.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close(ours.representations[2], bare(tokens).last_hidden_state, "last layer")
        assert_close(ours.contacts, bare.predict_contacts(tokens, torch.ones_like(tokens)), "contacts")
