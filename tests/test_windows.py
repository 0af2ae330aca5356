"""Windowed mode (issue 29): proteins longer than the model's context, cut into overlapping
windows that run as ordinary items and are stitched. Every output is checked against solo
fair-esm passes over each window's tokens: a position covered by one window equals that
window's row; a position covered by several, the average of theirs (docs/long-proteins.md).
The stitching arithmetic is written out here again, independently of service.api.windows."""

from __future__ import annotations

import random

import grpc
import numpy as np
import pytest
import requests
import torch
from reference import STANDARD_ORDER, assert_close, matrix, reference
from support import encode_request, start_gateway, start_server

from esm2_client.streams import StreamAssembler
from esm2_wire.proto import pb

AMINO = "ACDEFGHIKLMNPQRSTVWY"
COLUMN = {a: i for i, a in enumerate(STANDARD_ORDER)}
LONG = "".join(random.Random(29).choice(AMINO) for _ in range(5000))
# A large stride keeps the test to 5 windows: starts 0, 1000, 2000, 3000 and 3978 (the last ends
# at residue 5000), so 22 residues lie in two windows at each of the first three seams, 44 at the last.
WINDOW = pb.Window(length=1022, stride=1000)
STARTS = [0, 1000, 2000, 3000, 3978]
MAX_WINDOWED = 6000


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, checkpoint_dir, tiny):
    """A server offering windowed mode, with small unary/JSON response limits so that the large
    outputs must take EncodeStream."""
    with start_server(tmp_path_factory.mktemp("windowed"), "--max-windowed-residues", str(MAX_WINDOWED),
                      "--max-unary-response-mb", "16", "--max-json-response-mb", "16",
                      models={**tiny, "esm2-8m": None}, model_dir=checkpoint_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def windowed_gateway(windowed, tmp_path_factory):
    envoy = start_gateway(tmp_path_factory.mktemp("windowed-gateway"), windowed.port)
    yield envoy
    envoy.stop()


@pytest.fixture(scope="module")
def window_refs(reference_models):
    """Solo fair-esm passes over each window of LONG, layers 3 and 6."""
    loaded = reference_models["esm2-8m"]
    return [reference(loaded, LONG[s:s + WINDOW.length], layers=[3, 6]) for s in STARTS]


def stitched(rows: list[np.ndarray], starts=STARTS, length=len(LONG)) -> np.ndarray:
    """Each position the average of its rows in the windows that cover it (float64)."""
    total = np.zeros((length, *rows[0].shape[1:]))
    count = np.zeros(length)
    for start, array in zip(starts, rows):
        total[start:start + len(array)] += array
        count[start:start + len(array)] += 1
    return total / count.reshape(-1, *[1] * (rows[0].ndim - 1))


def stream(stub, request: pb.EncodeStreamRequest):
    assembler = StreamAssembler()
    for message in stub.EncodeStream(request, timeout=600):
        assembler.add(message)
    return assembler.ordered(len(request.items))


def items_run(server) -> float:
    return server.metrics().get('esm_items_total{model="esm2-8m"}', 0.0)


# ---- off by default: today's behaviour --------------------------------------------------------
def test_without_the_flag_windows_are_refused_and_long_items_get_todays_400(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Encode(encode_request("esm2-8m", [LONG]))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "items[0].sequence: 5000 residues; at most 2048 are allowed"
    request = encode_request("esm2-8m", ["MKT"])
    request.params.window.SetInParent()  # an empty window: the defaults
    with pytest.raises(grpc.RpcError) as caught:
        stub.Encode(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "params.window: windowed mode is off on this server (--max-windowed-residues is 0)"
    info = stub.ListModels(pb.ListModelsRequest()).models[0]
    assert info.max_windowed_residues == 0


def test_unwindowed_requests_answer_byte_for_byte_as_on_a_server_without_the_flag(stub, windowed, gateway,
                                                                                  windowed_gateway):
    """The flag changes nothing for a request without a window: same messages, same errors, same
    JSON bodies, as the server without it (the shared fixture) answers."""
    # Sequences no other test sends: the shared server may hold another test's answer for a common
    # one in its cache, computed in a batch with other items (equal only within the batch-invariance
    # tolerance; a serial full run once differed by 7e-5 in a log_prob).
    first, second, third = ("".join(random.Random(f"byte-for-byte {n}").choice(AMINO) for _ in range(length))
                            for n, length in ((1, 22), (2, 20), (3, 10)))
    ordinary = encode_request("esm2-8m", [first, second],
                              include=["mean", "per_token", "bos", "contacts", "logits", "attentions"])
    assert (windowed.stub.Encode(ordinary).SerializeToString(deterministic=True)
            == stub.Encode(ordinary).SerializeToString(deterministic=True))
    log_prob = pb.LogProbRequest(model="esm2-8m", items=[pb.SequenceItem(sequence=third)])
    assert windowed.stub.LogProb(log_prob) == stub.LogProb(log_prob)
    errors = []
    for target in (stub, windowed.stub):
        with pytest.raises(grpc.RpcError) as caught:
            target.Encode(encode_request("esm2-8m", [LONG]))
        errors.append((caught.value.code(), caught.value.details()))
    assert errors[0] == errors[1] == (grpc.StatusCode.INVALID_ARGUMENT,
                                      "items[0].sequence: 5000 residues; at most 2048 are allowed")
    body = {"items": [{"sequence": first}], "params": {"include": ["mean", "logits"]}}
    answers = [requests.post(g.url + "/api/v3/esm2-8m/encode/", json=body, timeout=60) for g in (gateway, windowed_gateway)]
    assert answers[0].status_code == answers[1].status_code == 200
    assert answers[0].content == answers[1].content
    long_body = {"items": [{"sequence": LONG}]}
    refused = [requests.post(g.url + "/api/v3/esm2-8m/encode/", json=long_body, timeout=60) for g in (gateway, windowed_gateway)]
    assert refused[0].status_code == refused[1].status_code == 400
    assert refused[0].json()["errors"] == refused[1].json()["errors"] == [
        {"index": 0, "field": "items[0].sequence", "detail": "5000 residues; at most 2048 are allowed"}]
    schema = requests.get(gateway.url + "/api/v3/schema/esm2-8m/encode/", timeout=60).json()
    assert "window" not in schema["properties"]["params"]["properties"]
    offered = requests.get(windowed_gateway.url + "/api/v3/schema/esm2-8m/encode/", timeout=60).json()
    assert offered["properties"]["params"]["properties"]["window"]["properties"]["length"]["maximum"] == 2048


# ---- exactness in every window ----------------------------------------------------------------
def test_windowed_encode_equals_fair_esm_in_every_window(windowed, window_refs):
    request = pb.EncodeStreamRequest(
        model="esm2-8m", items=[pb.SequenceItem(sequence=LONG)],
        params=pb.EncodeParams(include=["mean", "per_token", "bos", "logits", "contacts"], repr_layers=[3, -1],
                               window=WINDOW))
    (item,) = stream(windowed.stub, request)
    assert item.length == 5000
    once = np.ones(5000, dtype=bool)
    for a, b in zip(STARTS, STARTS[1:]):
        once[b:a + WINDOW.length] = False
    for layer in (3, 6):
        rows = item.per_token[layer]
        # positions covered once: that window's own row
        for start, ref in zip(STARTS, window_refs):
            span = slice(start, start + WINDOW.length)
            mine = once[span]
            assert_close(rows[span][mine], ref["per_token"][layer][mine], f"layer {layer} window at {start}")
        expected = stitched([ref["per_token"][layer] for ref in window_refs])
        assert_close(rows, expected, f"stitched per_token layer {layer}")
        assert_close(item.mean[layer], expected.mean(0), f"mean layer {layer}")
        assert_close(item.bos[layer], window_refs[0]["bos"][layer], f"bos layer {layer}")
    assert_close(item.logits, stitched([ref["logits"] for ref in window_refs]), "logits")
    # an overlapped position lies strictly between (or on) its two windows' values
    seam = 1010
    a, b = window_refs[0]["logits"][seam], window_refs[1]["logits"][seam - 1000]
    assert np.all(item.logits[seam] >= np.minimum(a, b) - 1e-5) and np.all(item.logits[seam] <= np.maximum(a, b) + 1e-5)
    # contacts: pairs inside some window hold the average over the windows holding both; NaN elsewhere
    total, count = np.zeros((5000, 5000)), np.zeros((5000, 5000))
    for start, ref in zip(STARTS, window_refs):
        span = slice(start, start + WINDOW.length)
        total[span, span] += ref["contacts"]
        count[span, span] += 1
    held = count > 0
    assert np.array_equal(~np.isnan(item.contacts), held)
    assert_close(item.contacts[held], total[held] / count[held], "contacts")


def test_windows_batch_merge_and_cache_as_ordinary_items(windowed, reference_models):
    """A protein made of one 1,022-residue block twice has two equal windows at stride 1,022:
    they are computed once, and asking again is answered from the cache."""
    block = LONG[:1022]
    request = encode_request("esm2-8m", [block + block], include=["per_token"], repr_layers=[-1])
    request.params.window.CopyFrom(pb.Window(length=1022, stride=1022))
    before = items_run(windowed)
    result = windowed.stub.Encode(request, timeout=300).results[0]
    assert items_run(windowed) - before == 1
    ref = reference(reference_models["esm2-8m"], block, layers=[6])["per_token"][6]
    assert_close(matrix(result.per_token_embeddings[0].embeddings), np.concatenate([ref, ref]), "two equal windows")
    again = windowed.stub.Encode(request, timeout=300).results[0]
    assert items_run(windowed) - before == 1
    assert again == result


def test_windowed_log_prob_sums_stitched_log_probabilities(windowed, windowed_gateway, window_refs):
    request = pb.LogProbRequest(model="esm2-8m", items=[pb.SequenceItem(sequence=LONG), pb.SequenceItem(sequence="MKT")],
                                params=pb.LogProbParams(window=WINDOW))
    values = [r.log_prob for r in windowed.stub.LogProb(request, timeout=300).results]
    log_probs = stitched([torch.log_softmax(torch.from_numpy(ref["logits"]).double(), -1).numpy() for ref in window_refs])
    want = sum(log_probs[i, COLUMN[a]] for i, a in enumerate(LONG))
    assert values[0] == pytest.approx(want, rel=1e-5)
    body = {"items": [{"sequence": LONG}, {"sequence": "MKT"}],
            "params": {"window": {"length": WINDOW.length, "stride": WINDOW.stride}}}
    answer = requests.post(windowed_gateway.url + "/api/v3/esm2-8m/log_prob/", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    assert [r["log_prob"] for r in answer.json()["results"]] == values


def _window_log_probs(loaded, window_tokens: str, local: int | None) -> np.ndarray:
    """fair-esm alone over one window, `local` (0-based) masked: log-softmax over the 20, [n, 20]."""
    text = window_tokens if local is None else window_tokens[:local] + "<mask>" + window_tokens[local + 1:]
    _, _, tokens = loaded.alphabet.get_batch_converter()([("x", text)])
    with torch.no_grad():
        logits = loaded.model(tokens)["logits"][0, 1:-1][:, [loaded.alphabet.get_idx(a) for a in STANDARD_ORDER]]
    return torch.log_softmax(logits.double(), -1).numpy()


def _masked_row(loaded, sequence: str, position: int, starts: list[int], length: int) -> np.ndarray:
    """The 0-based `position` masked in every window covering it; the windows' rows averaged."""
    rows = [_window_log_probs(loaded, sequence[s:s + length], position - s)[position - s]
            for s in starts if s <= position < s + length]
    return np.mean(rows, axis=0)


def test_windowed_masked_and_wt_marginals_against_fair_esm(windowed, reference_models, window_refs):
    loaded = reference_models["esm2-8m"]
    # 501: one window; 1011: windows at 0 and 1000; 4001: windows at 3000 and 3978
    positions = [501, 1011, 4001]
    variants = [f"{LONG[p - 1]}{p}{'A' if LONG[p - 1] != 'A' else 'C'}" for p in positions]
    variants.append(":".join(variants[:2]))
    request = pb.ScoreRequest(model="esm2-8m", params=pb.ScoreParams(method="masked_marginal", window=WINDOW),
                              items=[pb.ScoreItem(sequence=LONG, variants=variants)])
    scores = list(windowed.stub.Score(request, timeout=600).results[0].scores)
    ratios = []
    for p, variant in zip(positions, variants):
        row = _masked_row(loaded, LONG, p - 1, STARTS, WINDOW.length)
        ratios.append(row[COLUMN[variant[-1]]] - row[COLUMN[variant[0]]])
    assert scores == pytest.approx([*ratios, ratios[0] + ratios[1]], rel=1e-5, abs=1e-5)
    # ScoreStream sends each variant once its windows' passes are done: the same scores
    streamed = {}
    for message in windowed.stub.ScoreStream(pb.ScoreStreamRequest(
            model=request.model, params=request.params, items=request.items), timeout=600):
        streamed.update(zip(message.variant_indexes, message.scores))
        assert message.passes_total == 5  # 501: one window; 1011 and 4001: two each; the multi-mutant reuses them
    assert [streamed[i] for i in range(len(variants))] == scores
    request.params.method = "wt_marginal"
    wt = list(windowed.stub.Score(request, timeout=600).results[0].scores)
    log_probs = stitched([torch.log_softmax(torch.from_numpy(ref["logits"]).double(), -1).numpy() for ref in window_refs])
    want = [log_probs[p - 1, COLUMN[v[-1]]] - log_probs[p - 1, COLUMN[v[0]]] for p, v in zip(positions, variants)]
    assert wt == pytest.approx([*want, want[0] + want[1]], rel=1e-5, abs=1e-5)


def test_windowed_pll_from_stitched_masked_passes(windowed, reference_models):
    loaded = reference_models["esm2-8m"]
    sequence = LONG[:30].replace("W", "A")
    starts, length = [0, 10], 20  # window 20, stride 15: 0..20 and the last, 10..30
    request = pb.ScoreRequest(model="esm2-8m", params=pb.ScoreParams(method="pll", window=pb.Window(length=20, stride=15)),
                              items=[pb.ScoreItem(sequence=sequence, variants=[f"{sequence[14]}15W"])])
    result = windowed.stub.Score(request, timeout=600).results[0]
    mutant = sequence[:14] + "W" + sequence[15:]

    def pll(text: str) -> float:
        return sum(_masked_row(loaded, text, p, starts, length)[COLUMN[a]] for p, a in enumerate(text))
    assert result.pseudo_log_likelihood == pytest.approx(pll(sequence), rel=1e-5)
    assert result.variant_pseudo_log_likelihoods[0] == pytest.approx(pll(mutant), rel=1e-5)


# ---- bounds and refusals ----------------------------------------------------------------------
def _refused(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    return caught.value.code(), caught.value.details()


def test_windowed_refusals_name_the_field_and_the_bound(windowed, windowed_gateway):
    stub = windowed.stub
    request = encode_request("esm2-8m", ["MKT"], include=["attentions"])
    request.params.window.SetInParent()
    code, details = _refused(stub.Encode, request)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("params.include: attentions are not available in windowed mode")
    bad = encode_request("esm2-8m", ["MKT"])
    bad.params.window.CopyFrom(pb.Window(length=2049, stride=3000))
    code, details = _refused(stub.Encode, bad)
    assert "params.window.length: 2049 residues; allowed: 1 to 2048" in details
    assert "params.window.stride: 3000; allowed: 1 to the window length (2049)" in details
    too_long = encode_request("esm2-8m", ["A" * (MAX_WINDOWED + 1)])
    too_long.params.window.SetInParent()
    code, details = _refused(stub.Encode, too_long)
    assert details == f"items[0].sequence: {MAX_WINDOWED + 1} residues; at most {MAX_WINDOWED} are allowed"
    # per-token output of a long protein is over this server's 16 MiB unary and JSON limits: EncodeStream carries it
    big = encode_request("esm2-8m", [LONG], include=["per_token"], repr_layers=[1, 2, 3])
    big.params.window.SetInParent()
    code, details = _refused(stub.Encode, big)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "response too large for a unary call" in details and "esm.v1.Esm2Service/EncodeStream" in details
    body = {"items": [{"sequence": LONG}], "params": {"include": ["per_token"], "window": {}}}
    answer = requests.post(windowed_gateway.url + "/api/v3/esm2-8m/encode/", json=body, timeout=60)
    assert answer.status_code == 400 and "esm.v1.Esm2Service/EncodeStream" in answer.json()["detail"]
    body["params"]["window"] = {"length": 0}
    answer = requests.post(windowed_gateway.url + "/api/v3/esm2-8m/encode/", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["errors"][0]["field"] == "params.window.length"


# ---- the client and the CLI -------------------------------------------------------------------
def test_client_and_cli_carry_the_window(windowed, server, tmp_path):
    """`window=` and `--window LENGTH[:STRIDE]` ask for exactly what the RPCs above answer (whose
    values are checked against fair-esm); a FASTA of long proteins needs no --truncate."""
    import subprocess
    import sys
    from pathlib import Path

    from esm2_client import Esm2Client

    protein = LONG[:3000]  # windows of 1,022 every 1,000: starts 0, 1000 and 1978
    request = encode_request("esm2-8m", [protein], include=["mean", "per_token"], repr_layers=[-1])
    request.params.window.CopyFrom(pb.Window(length=1022, stride=1000))
    direct = windowed.stub.Encode(request, timeout=300).results[0]
    want_mean = np.asarray(direct.embeddings[0].embedding, dtype=np.float32)
    with Esm2Client(windowed.target) as client:
        (outputs,) = client.encode("esm2-8m", [protein], ["mean", "per_token"], [-1], window=(1022, 1000))
        assert np.array_equal(outputs.mean[6], want_mean)
        assert np.array_equal(outputs.per_token[6], matrix(direct.per_token_embeddings[0].embeddings))
        log_prob = windowed.stub.LogProb(pb.LogProbRequest(
            model="esm2-8m", items=[pb.SequenceItem(sequence=protein)], params=pb.LogProbParams(window=pb.Window())))
        assert client.log_prob("esm2-8m", [protein], window=0) == [log_prob.results[0].log_prob]
    fasta = tmp_path / "long.fasta"
    fasta.write_text(f">long\n{protein}\n>short\nMKTAYIAKQR\n")
    out = tmp_path / "out.npz"
    esm2 = Path(sys.executable).with_name("esm2")
    command = [str(esm2)] if esm2.exists() else [sys.executable, "-m", "esm2_client.cli"]
    done = subprocess.run([*command, "embed", str(fasta), "-o", str(out), "-m", "esm2-8m", "--server", windowed.target,
                           "-q", "--window", "1022:1000"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(out)["long/mean/6"], want_mean)
    refused = subprocess.run([*command, "embed", str(fasta), "-o", str(tmp_path / "no.npz"), "-m", "esm2-8m",
                              "--server", server.target, "-q", "--window", "1022"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "does not offer windowed mode" in refused.stderr
    unwindowed = subprocess.run([*command, "embed", str(fasta), "-o", str(tmp_path / "no.npz"), "-m", "esm2-8m",
                                 "--server", windowed.target, "-q"], capture_output=True, text=True, timeout=120)
    assert unwindowed.returncode != 0
    assert "or --window LENGTH[:STRIDE] (this server embeds up to 6000 residues in windows)" in unwindowed.stderr
    variants = [f"{protein[1010]}1011A" if protein[1010] != "A" else f"{protein[1010]}1011C"]
    score = pb.ScoreRequest(model="esm2-8m", params=pb.ScoreParams(window=pb.Window(length=1022, stride=1000)),
                            items=[pb.ScoreItem(sequence=protein, variants=variants)])
    want = windowed.stub.Score(score, timeout=300).results[0].scores[0]
    scored = subprocess.run([*command, "score", "-m", "esm2-8m", "--server", windowed.target, "-q",
                             "--sequence", protein, "--mutations", *variants, "--window", "1022:1000"],
                            capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr
    assert float(scored.stdout.splitlines()[1].split(",")[-1]) == pytest.approx(want, abs=1e-6)
