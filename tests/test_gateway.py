"""The BioLM-compatible JSON API through a real Envoy in front of real servers."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
import requests
from support import REPO, body, encode_request, free_port, post, start_gateway, start_server, wait_for

from esm2_wire.proto import pb, pb_grpc

KEY = "test-key-0123456789"
ALL_INCLUDE = ["mean", "per_token", "bos", "contacts", "logits", "attentions"]
SEQS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "GSHMSLFDFFKNKG-SEQNAVLKAW"]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny):
    """A server that wants API keys (ESM_API_KEYS), with its own gateway."""
    tmp = tmp_path_factory.mktemp("keyed")
    with start_server(tmp, models=tiny, env={"ESM_API_KEYS": f"other-key,{KEY}"}) as proc:
        envoy = start_gateway(tmp, proc.port)
        yield envoy
        envoy.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory, checkpoint_dir):
    """A server with a 1 MiB JSON limit and a queue of 8 items, run one at a time."""
    tmp = tmp_path_factory.mktemp("limited")
    with start_server(tmp, "--max-json-response-mb", "1", "--max-queue-items", "8", "--max-batch-size", "1",
                      models={"esm2-8m": None}, model_dir=checkpoint_dir) as proc:
        # The default retry policy (3 retries): a refusal must not be retried.
        envoy = start_gateway(tmp, proc.port, max_json_response_mb=1)
        yield envoy, proc
        envoy.stop()


def close(got, want) -> None:
    got, want = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def as_array(matrix: pb.Matrix) -> np.ndarray:
    return np.asarray(matrix.values, dtype=np.float32).reshape(matrix.rows, matrix.cols)


def assert_same_as_grpc(result: dict, expected: pb.EncodeResult) -> None:
    """A JSON result carries exactly what the gRPC result carries, and nothing else."""
    keys = {"sequence_index"}
    assert result["sequence_index"] == expected.sequence_index
    for key in ("embeddings", "bos_embeddings", "per_token_embeddings"):
        entries = getattr(expected, key)
        if not entries:
            continue
        keys.add(key)
        assert [e["layer"] for e in result[key]] == [e.layer for e in entries]
        for got, want in zip(result[key], entries):
            if key == "per_token_embeddings":
                assert set(got) == {"layer", "embeddings"}
                close(got["embeddings"], as_array(want.embeddings))
            else:
                assert set(got) == {"layer", "embedding"}
                close(got["embedding"], want.embedding)
    for key in ("contacts", "attentions", "logits"):
        if expected.HasField(key):
            keys.add(key)
            close(result[key], as_array(getattr(expected, key)))
    if expected.vocab_tokens:
        keys.add("vocab_tokens")
        assert result["vocab_tokens"] == list(expected.vocab_tokens)
    assert set(result) == keys


# ---- encode / predict agree with gRPC ---------------------------------------------
@pytest.mark.parametrize(
    "include, repr_layers",
    [*[([option], None) for option in ALL_INCLUDE], (ALL_INCLUDE, [0, 3, -1]), (["mean", "bos"], [6, -7, 2]),
     (None, None), (["per_residue"], [-2])],
)
def test_encode_matches_grpc(gateway, stub, include, repr_layers):
    response = post(gateway, "/api/v3/esm2-8m/encode/", body(SEQS, include, repr_layers))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    expected = stub.Encode(encode_request("esm2-8m", SEQS, include or (), repr_layers or ()))
    results = response.json()["results"]
    assert len(results) == len(SEQS)
    for result, want in zip(results, expected.results):
        assert_same_as_grpc(result, want)


def test_predict_matches_grpc(gateway, stub):
    sequences = ["MKT<mask>YIAKQR", "<mask>SHM<mask><mask>FD"]
    response = post(gateway, "/api/v3/esm2-8m/predict", body(sequences))
    assert response.status_code == 200, response.text
    expected = stub.Predict(pb.PredictRequest(model="esm2-8m", items=[pb.SequenceItem(sequence=s) for s in sequences]))
    for index, (result, want) in enumerate(zip(response.json()["results"], expected.results)):
        assert set(result) == {"sequence_index", "logits", "sequence_tokens", "vocab_tokens"}
        assert result["sequence_index"] == index
        assert result["sequence_tokens"] == list(want.sequence_tokens)
        assert result["vocab_tokens"] == list(want.vocab_tokens) and len(result["vocab_tokens"]) == 20
        close(result["logits"], as_array(want.logits))
    assert response.json()["results"][1]["sequence_tokens"][:5] == ["<mask>", "S", "H", "M", "<mask>"]


# ---- the spec's request shapes and response structure --------------------------
@pytest.mark.parametrize("slash", ["", "/"])
def test_spec_example_requests(gateway, slash):
    encode = post(gateway, f"/api/v3/esm2-8m/encode{slash}",
                  {"params": {"repr_layers": [-1], "include": ["mean"]}, "items": [{"sequence": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"}]})
    assert encode.status_code == 200, encode.text
    [result] = encode.json()["results"]
    assert set(result) == {"sequence_index", "embeddings"}
    assert [set(e) for e in result["embeddings"]] == [{"layer", "embedding"}]
    assert result["embeddings"][0]["layer"] == 6 and len(result["embeddings"][0]["embedding"]) == 320

    predict = post(gateway, f"/api/v3/esm2-8m/predict{slash}", {"items": [{"sequence": "MKTAYIAK<mask>RQISFVK"}]})
    assert predict.status_code == 200, predict.text
    [result] = predict.json()["results"]
    assert np.asarray(result["logits"]).shape == (len(result["sequence_tokens"]), 20)


def test_spec_limits_succeed(gateway):
    """8 items, one of 2048 residues and one with '-', every output: the most the spec allows per call."""
    sequences = ["M" + "ACDEFGHIKLMNPQRSTVWY" * 102 + "MKTAYIA", "MKT-AYI", *["GSHM"] * 6]
    assert len(sequences[0]) == 2048
    response = post(gateway, "/api/v3/esm2-tiny/encode/", body(sequences, ALL_INCLUDE, [0, 1, 2]))
    assert response.status_code == 200, response.text[:500]
    results = response.json()["results"]
    assert [r["sequence_index"] for r in results] == list(range(8))
    assert np.asarray(results[0]["per_token_embeddings"][2]["embeddings"]).shape == (2048, 64)
    assert np.asarray(results[0]["attentions"]).shape == (2048, 2048)
    assert np.asarray(results[1]["contacts"]).shape == (7, 7)


def test_moderately_large_response_arrives_whole(gateway, stub):
    """~30 MB of JSON, far beyond Envoy's default 1 MiB transcoder buffer."""
    sequences = [("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 13)[: 380 + i] for i in range(8)]
    response = post(gateway, "/api/v3/esm2-8m/encode", body(sequences, ["per_token"], [0, 3, 6]),
                    headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200, response.text[:500]
    # Streamed a result at a time (issue 16): chunked, so Envoy never holds the whole body.
    assert response.headers["transfer-encoding"] == "chunked" and len(response.content) > 25_000_000
    results = response.json()["results"]
    expected = stub.Encode(encode_request("esm2-8m", sequences[-1:], ["per_token"], [6]))
    close(results[-1]["per_token_embeddings"][2]["embeddings"], as_array(expected.results[0].per_token_embeddings[0].embeddings))
    for sequence, result in zip(sequences, results):
        assert [np.asarray(e["embeddings"]).shape for e in result["per_token_embeddings"]] == [(len(sequence), 320)] * 3


# ---- gzip --------------------------------------------------------------------------
def test_gzip_request_and_response(gateway):
    payload = json.dumps(body(SEQS, ["per_token", "logits"])).encode()
    plain = requests.post(gateway.url + "/api/v3/esm2-8m/encode/", data=payload, timeout=60,
                          headers={"Content-Type": "application/json", "Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    zipped = requests.post(gateway.url + "/api/v3/esm2-8m/encode/", data=gzip.compress(payload), timeout=60, stream=True,
                           headers={"Content-Type": "application/json", "Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
    assert zipped.status_code == 200
    assert zipped.headers["content-encoding"] == "gzip"
    raw = zipped.raw.read(decode_content=False)
    assert len(raw) < len(plain.content) / 1.3
    assert json.loads(gzip.decompress(raw)) == plain.json()


def test_gzip_request_with_high_ratio(gateway):
    """Poly-A test sequences inflate >100x, past Envoy's default cap that truncates bodies."""
    payload = json.dumps(body(["A" * 2048] * 8)).encode()
    zipped = gzip.compress(payload)
    assert len(payload) / len(zipped) > 100
    response = requests.post(gateway.url + "/api/v3/esm2-tiny/encode", data=zipped, timeout=60,
                             headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 8


# ---- schema and model list ---------------------------------------------------------
@pytest.mark.parametrize("action", ["encode", "predict"])
@pytest.mark.parametrize("slash", ["", "/"])
def test_schema(gateway, action, slash):
    response = requests.get(f"{gateway.url}/api/v3/schema/esm2-8m/{action}{slash}", timeout=10)
    assert response.status_code == 200
    schema = response.json()
    assert schema["properties"]["items"]["maxItems"] == 8
    assert schema["properties"]["items"]["items"]["properties"]["sequence"]["minLength"] == 1
    assert schema["required"] == ["items"]


def test_models(gateway):
    models = requests.get(gateway.url + "/api/v3/models", timeout=10).json()["models"]
    assert {m["name"]: m["embed_dim"] for m in models} == {"esm2-8m": 320, "esm2-tiny": 64}
    for m in models:  # a caller sees the format and a file name, never a server path
        assert (m["source_format"], m["finetuned_from"]) == ("SOURCE_FORMAT_FAIR_ESM", "")
        assert "/" not in m["checkpoint"] and m["checkpoint"].endswith(".pt")


# ---- errors ------------------------------------------------------------------------
LONG = "A" * 2049
VALIDATION_ERRORS = [
    ("encode", body(["MKT", ""]), ["items[1].sequence", "empty"]),
    ("encode", body(["MKT", "MKXZ", "MK1T"]), ["items[2].sequence", "'1'", "position 3"]),
    ("encode", body(["mkt"]), ["items[0].sequence", "lowercase"]),
    ("encode", body([LONG]), ["items[0].sequence", "2049 residues", "2048"]),
    ("encode", body(["MKT"] * 9), ["items", "1 to 8", "got 9"]),
    ("encode", {"items": []}, ["items", "got 0"]),
    ("encode", {"params": {"include": ["mean"]}}, ["missing required field 'items'"]),
    ("encode", body(["MKT"], ["mean", "everything"]), ["params.include[1]", "'everything'", "per_token"]),
    ("encode", body(["MKT"], None, [7]), ["params.repr_layers[0]", "layer 7", "-7 to 6"]),
    ("encode", body(["MKT"], None, [0, -8]), ["params.repr_layers[1]", "-8"]),
    ("encode", body(["MK<mask>T"]), ["items[0].sequence", "<mask>", "predict"]),
    ("predict", body(["MKT"]), ["items[0].sequence", "at least one <mask>"]),
    ("predict", body(["MK-<mask>"]), ["items[0].sequence", "'-'", "position 3"]),
    ("encode", {"items": [{"sequence": 5}]}, ["items[0].sequence", "expected a string", "5"]),
    ("encode", {"params": {"repr_layers": [1.5]}, "items": [{"sequence": "MKT"}]}, ["params.repr_layers[0]", "1.5"]),
]


@pytest.mark.parametrize("action, request_body, fragments", VALIDATION_ERRORS)
def test_validation_errors_are_400_json(gateway, action, request_body, fragments):
    response = post(gateway, f"/api/v3/esm2-8m/{action}/", request_body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["message"]
    for fragment in fragments:
        assert fragment in message


def test_malformed_json_is_400(gateway):
    response = requests.post(gateway.url + "/api/v3/esm2-8m/encode", data=b'{"items": [', timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["message"]


@pytest.mark.parametrize(
    "method, path, fragment",
    [
        ("post", "/api/v3/esm2-3b/encode/", "esm2-3b"),
        ("post", "/api/v3/esm2-35m/predict", "esm2-35m"),
        ("get", "/api/v3/schema/esm2-nope/encode/", "esm2-nope"),
        ("get", "/api/v3/schema/esm2-8m/fold/", "fold"),
        ("post", "/api/v3/esm2-8m/fold/", "/api/v3/esm2-8m/fold/"),
        ("post", "/api/v2/esm2-8m/encode/", "/api/v2/esm2-8m/encode/"),
        ("post", "/", "/"),  # GET / redirects to the playground (test_playground.py)
        ("get", "/api/v3/esm2-8m/encode/", "encode"),
    ],
)
def test_unknown_model_or_path_is_404(gateway, method, path, fragment):
    response = getattr(requests, method)(gateway.url + path, json=body(["MKT"]), timeout=10)
    assert response.status_code == 404, response.text
    assert fragment in response.json()["message"]


def test_too_large_json_response_says_use_streaming(limited):
    envoy, _ = limited
    response = post(envoy, "/api/v3/esm2-8m/encode/", body(["MKTAYIAKQR" * 50] * 2, ["per_token"]))
    assert response.status_code == 400
    message = response.json()["message"]
    assert "response too large for JSON" in message and "1 MiB" in message and "EncodeStream" in message
    small = post(envoy, "/api/v3/esm2-8m/encode/", body(["MKTAYIAKQR" * 20], ["per_token"]))
    assert small.status_code == 200 and len(small.content) < 1 << 20


def test_full_queue_is_429_with_retry_after(limited):
    envoy, proc = limited
    # Distinct sequences: identical ones would be computed once and take one queue place.
    slow = body([("MKTAYIAKQR" * 100)[:-1] + letter for letter in "ACDEFGHI"])
    first: list[requests.Response] = []
    worker = threading.Thread(target=lambda: first.append(post(envoy, "/api/v3/esm2-8m/encode", slow)))
    worker.start()
    # the first request's items wait behind one running item
    wait_for(lambda: proc.metric("esm_queue_items") > 0 or not worker.is_alive(), "queued items", timeout=30)
    assert worker.is_alive(), first
    busy = post(envoy, "/api/v3/esm2-8m/encode", body([("MKTAYIAKQR" * 100)[:-1] + c for c in "KLMNPQRS"]),
                headers={"x-request-id": "refused-once"})
    worker.join()
    assert first[0].status_code == 200
    assert busy.status_code == 429, busy.text
    assert busy.headers["retry-after"] == "1"
    assert "busy" in busy.json()["message"]
    # Answered from its one try. Before, Envoy retried RESOURCE_EXHAUSTED: tries=4 after 4 s of back-off
    # on the same full queue (or a 200 once it had drained), and the caller never saw the 429 at once.
    wait_for(lambda: "id=refused-once " in envoy.log(), "the refused request's access log line", timeout=10)
    line = next(line for line in envoy.log().splitlines() if "id=refused-once " in line)
    assert '" 429 ' in line and line.endswith(" tries=1"), line


def test_upstream_down_is_503_json(gateway_factory):
    envoy = gateway_factory(free_port(), healthy=False)  # nothing listens there
    response = post(envoy, "/api/v3/esm2-8m/encode/", body(["MKT"]))
    assert response.status_code == 503
    assert response.json()["status_code"] == 503 and response.json()["detail"]
    assert response.headers["retry-after"] == "1"  # unavailable now, maybe not in a second
    assert requests.get(envoy.url + "/healthz", timeout=10).status_code == 503


# ---- API keys --------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Token wrong-key"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_key_is_401(keyed, headers):
    for action, sequence in (("encode", "MKT"), ("predict", "MK<mask>")):
        response = post(keyed, f"/api/v3/esm2-tiny/{action}/", body([sequence]), headers=headers)
        assert response.status_code == 401
        assert "Authorization: Token <key>" in response.json()["message"]
        assert KEY not in response.text


def test_right_key_is_200_and_schema_health_models_stay_open(keyed):
    for action, sequence in (("encode", "MKT"), ("predict", "MK<mask>")):
        response = post(keyed, f"/api/v3/esm2-tiny/{action}/", body([sequence]), headers={"Authorization": f"Token {KEY}"})
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["sequence_index"] == 0
    assert requests.get(keyed.url + "/api/v3/schema/esm2-tiny/encode/", timeout=10).status_code == 200
    assert requests.get(keyed.url + "/api/v3/models", timeout=10).status_code == 200
    assert requests.get(keyed.url + "/healthz", timeout=10).status_code == 200


def test_no_keys_configured_needs_no_header(gateway):
    response = post(gateway, "/api/v3/esm2-tiny/encode/", body(["MKT"]), headers={"Authorization": "Token anything"})
    assert response.status_code == 200


# ---- the gateway port also passes gRPC through ---------------------------------
def test_grpc_through_gateway_port(gateway, stub):
    with grpc.insecure_channel(gateway.url.removeprefix("http://")) as channel:
        via_envoy = pb_grpc.Esm2ServiceStub(channel).Encode(encode_request("esm2-tiny", ["MKT"]))
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.Esm2ServiceStub(channel).Encode(encode_request("esm2-nope", ["MKT"]))
    assert via_envoy == stub.Encode(encode_request("esm2-tiny", ["MKT"]))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


# ---- the launcher (make serve / make demo) -------------------------------------------
def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_launcher_starts_and_stops_server_and_envoy(tmp_path, tiny_checkpoint):
    http_port, grpc_port = free_port(), free_port()
    log = open(tmp_path / "launch.log", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gateway.launch", "--http-host", "127.0.0.1", "--http-port", str(http_port),
         "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", "0",
         "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}", "--offline"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: launcher.poll() is not None
                 or requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2).status_code == 200,
                 lambda: (tmp_path / "launch.log").read_text(), timeout=60)
        assert launcher.poll() is None, (tmp_path / "launch.log").read_text()
        response = requests.post(f"http://127.0.0.1:{http_port}/api/v3/esm2-tiny/encode", json=body(["MKT"]), timeout=30)
        assert response.status_code == 200
        # The address is announced once it serves: after the server is ready, never before.
        announced = f"serving: the JSON API on http://127.0.0.1:{http_port}/api/v3/"
        wait_for(lambda: announced in (tmp_path / "launch.log").read_text(), "the announcement", timeout=30)
        text = (tmp_path / "launch.log").read_text()
        assert text.count(announced) == 1 and text.index("ready: serving") < text.index(announced)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
        assert not _port_open(http_port) and not _port_open(grpc_port)
        assert "stopped" in (tmp_path / "launch.log").read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        log.close()


def test_launcher_without_weights_ends_with_the_offline_alternative(tmp_path):
    """`make serve` on a machine without the weights: every place looked, no address announced
    (nothing serves), and the last line says what works offline."""
    run = subprocess.run(
        [sys.executable, "-m", "gateway.launch", "--http-host", "127.0.0.1", "--http-port", str(free_port()),
         "--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", "0",
         "--models", "esm2-35m", "--model-dir", str(tmp_path / "models"), "--offline"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")},
    )
    assert run.returncode == 1
    output = run.stderr + run.stdout
    assert "no checkpoint for model 'esm2-35m'" in output and str(tmp_path / "models") in output
    assert "serving: the JSON API" not in output and "/api/v3/" not in output
    last = output.strip().splitlines()[-1]
    assert "nothing was served: every replica exited before serving" in last and "`make demo`" in last, last
