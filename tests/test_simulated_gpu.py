"""The server's real start-up and request path with `--device cuda`, on simulated CUDA devices
(tests/simulated_cuda.py, loaded through ESM_DEVICE_PLUGIN; docs/gpus.md): encode
with every output, predict, the streams, log_prob and score against fair-esm at the CPU tests'
tolerances, on two devices (`cuda:0,cuda:1`); a bare `cuda` through gateway.launch; `auto`
choosing the simulated GPU and its precision; `cuda:7` refused at start-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
from reference import (INCLUDE_ALL, SEQUENCES, assert_close, check_result, direct_log_prob, direct_masked_marginal,
                       direct_pll, reference, score_request)
from simulated_cuda import installed, server_env
from support import REPO, body, encode_request, free_port, start_server, wait_for

from esm2_client import Esm2Client
from esm2_wire.proto import pb
from service import server

WILD_TYPE = "MKTAYIAKQRQISFVKSHFSRQ"


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory, checkpoint_dir, tiny):
    """Two simulated H100s (9.0), a worker on each; fp32, to compare with fair-esm's fp32."""
    with start_server(tmp_path_factory.mktemp("gpu-server"), "--device", "cuda:0,cuda:1", "--precision", "fp32",
                      models={**tiny, "esm2-8m": None}, model_dir=checkpoint_dir, env=server_env(devices=2)) as proc:
        yield proc


def test_each_device_reports_its_memory_estimate_and_peak(gpu_server):
    """The start-up estimate per device, and (after a batch there) the peak the device reports:
    the simulated device's peak is its largest batch of token ids, a stand-in for the plumbing."""
    gpu_server.stub.Encode(encode_request("esm2-tiny", ["MKTAYIAKQR"] * 2, ["mean"]))
    samples = gpu_server.metrics()
    for device in ("cuda:0", "cuda:1"):
        assert samples[f'esm_device_memory_estimate_bytes{{device="{device}"}}'] > 1 << 20  # two models' weights
    assert samples['esm_device_memory_peak_bytes{device="cuda:0"}'] > 0 \
        or samples['esm_device_memory_peak_bytes{device="cuda:1"}'] > 0


def test_two_devices_serve_every_output_equal_to_fair_esm(gpu_server, reference_models):
    info = {m.name: m for m in gpu_server.stub.ListModels(pb.ListModelsRequest()).models}
    assert (info["esm2-8m"].device, info["esm2-8m"].precision) == ("cuda:0,cuda:1", "fp32")
    for model in ("esm2-tiny", "esm2-8m"):
        response = gpu_server.stub.Encode(encode_request(model, SEQUENCES, INCLUDE_ALL, [-1, 0, 1]))
        n = reference_models[model].num_layers
        for sequence, result in zip(SEQUENCES, response.results, strict=True):
            check_result(result, reference(reference_models[model], sequence), [n, 0, 1], INCLUDE_ALL)


def test_predict_and_the_streams_equal_fair_esm(gpu_server, reference_models):
    loaded = reference_models["esm2-8m"]
    with Esm2Client(f"127.0.0.1:{gpu_server.port}") as client:
        streamed = client.encode("esm2-8m", [WILD_TYPE * 3, "ACDEF"], include=INCLUDE_ALL, repr_layers=[-1, 2])
        predicted = client.predict("esm2-8m", ["MK<mask>AYIAKQR", "<mask>CDEF"])
    for sequence, out in zip([WILD_TYPE * 3, "ACDEF"], streamed, strict=True):
        ref = reference(loaded, sequence)
        for layer in (6, 2):
            for kind in ("mean", "bos", "per_token"):
                assert_close(getattr(out, kind)[layer], ref[kind][layer], f"{kind} {layer}")
        for kind in ("logits", "contacts", "attentions"):
            assert_close(getattr(out, kind), ref[kind], kind)
    for sequence, out in zip(["MK<mask>AYIAKQR", "<mask>CDEF"], predicted, strict=True):
        assert_close(out.logits, reference(loaded, sequence, layers=[])["logits"], "predict logits")


def test_log_prob_and_score_equal_fair_esm(gpu_server, reference_models):
    loaded = reference_models["esm2-8m"]
    sequences = [WILD_TYPE, "MLKXVW"]
    got = gpu_server.stub.LogProb(pb.LogProbRequest(model="esm2-8m", items=[pb.SequenceItem(sequence=s)
                                                                             for s in sequences]))
    for sequence, result in zip(sequences, got.results, strict=True):
        assert result.log_prob == pytest.approx(direct_log_prob(loaded, sequence), rel=1e-5, abs=1e-4)
    variants = ["K2A", "T3G:A4C", "Q22W"]
    masked = gpu_server.stub.Score(score_request("esm2-8m", [(WILD_TYPE, variants)]))
    assert list(masked.results[0].scores) == pytest.approx(
        [direct_masked_marginal(loaded, WILD_TYPE, v) for v in variants], abs=1e-4)
    pll = gpu_server.stub.Score(score_request("esm2-tiny", [("MKTAYIAK", [])], "pll"))
    assert pll.results[0].pseudo_log_likelihood == pytest.approx(direct_pll(reference_models["esm2-tiny"], "MKTAYIAK"),
                                                                 abs=1e-4)


def test_a_bare_cuda_serves_through_the_launcher(tmp_path, tiny_checkpoint, reference_models):
    """`--device cuda`, as compose.gpu.yaml and the GPU overlay pass it, through gateway.launch."""
    http_port, grpc_port = free_port(), free_port()
    with open(tmp_path / "launch.log", "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "gateway.launch", "--http-host", "127.0.0.1", "--http-port", str(http_port),
             "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", "0", "--device", "cuda",
             "--precision", "fp32", "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}",
             "--offline"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **server_env()})
        try:
            wait_for(lambda: launcher.poll() is not None
                     or requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2).status_code == 200,
                     lambda: (tmp_path / "launch.log").read_text(), timeout=90)
            assert launcher.poll() is None, (tmp_path / "launch.log").read_text()
            response = requests.post(f"http://127.0.0.1:{http_port}/api/v3/esm2-tiny/encode",
                                     json=body([WILD_TYPE], include=["mean"]), timeout=30)
            assert response.status_code == 200, response.text
            assert "on cuda:0" in (tmp_path / "launch.log").read_text()
        finally:
            launcher.terminate()
            assert launcher.wait(60) == 0


def test_auto_picks_the_gpu_and_its_precision(server_factory, tiny_checkpoint, reference_models):
    """`--device auto` (the default) on a GPU host: cuda:0, and bf16 where it is native (9.0)."""
    proc = server_factory(models={"esm2-tiny": tiny_checkpoint}, env=server_env(capability="9.0"))
    (info,) = proc.stub.ListModels(pb.ListModelsRequest()).models
    assert (info.device, info.precision) == ("cuda:0", "bf16")
    response = proc.stub.Encode(encode_request("esm2-tiny", [WILD_TYPE], ["mean"]))
    assert len(response.results[0].embeddings[0].embedding) == reference_models["esm2-tiny"].embed_dim


def test_a_device_index_past_the_count_is_refused_at_start_up(tiny_checkpoint, caplog, monkeypatch):
    """In process: the refusal comes before any model is read (exit 2, the message naming --device).
    The server's log set-up is left out, so that the test's log capture stays in place."""
    monkeypatch.setattr(server.logs, "setup", lambda log_format: None)
    with installed(devices=1):
        code = server.main(["--device", "cuda:7", "--models", "esm2-tiny", "--checkpoint",
                            f"esm2-tiny={tiny_checkpoint}"])
    assert code == 2
    assert "--device cuda:7: this machine has 1 CUDA device (cuda:0)" in caplog.text
