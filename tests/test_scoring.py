"""Scoring on the server (issue 20): BioLM's log_prob, and Score's masked marginals, wild-type
marginals and pseudo-log-likelihoods, each against the computation done directly on fair-esm,
through gRPC and through a real Envoy, with their bounds."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import grpc
import numpy as np
import pytest
import requests
import torch
from reference import (COLUMN, direct_log_prob, direct_masked_marginal, direct_pll, direct_wt_marginal, mutant_of,
                       score_request)
from support import ServerProcess, start_gateway

from esm2_wire.proto import pb

JSON = {"Content-Type": "application/json"}
AMINO = "ACDEFGHIKLMNPQRSTVWY"
WILD_TYPE = "MKTAYIAKQRQISFVKSHFSRQ"
VARIANTS = ["K2A", "T3G:A4C", "Q22W", "K2L", "M1M"]


def items_run(server, model: str) -> float:
    return server.metrics().get(f'esm_items_total{{model="{model}"}}', 0.0)


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    envoy = start_gateway(tmp_path_factory.mktemp("scoring-gateway"), server.port)
    yield envoy
    envoy.stop()


# ---- log_prob ----------------------------------------------------------------------------------
LOG_PROB_SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "MLKXVW-BZ", "A", "XXXX"]


def test_log_prob_equals_biolms_computation_on_fair_esm(stub, reference_models):
    response = stub.LogProb(pb.LogProbRequest(model="esm2-8m", items=[pb.SequenceItem(sequence=s)
                                                                        for s in LOG_PROB_SEQUENCES]))
    assert [r.sequence_index for r in response.results] == [0, 1, 2, 3]
    for sequence, result in zip(LOG_PROB_SEQUENCES, response.results):
        want = direct_log_prob(reference_models["esm2-8m"], sequence)
        assert result.log_prob == pytest.approx(want, rel=1e-5, abs=1e-4), sequence
    assert response.results[3].log_prob == 0.0  # no standard residue: nothing to sum
    assert response.results[0].log_prob < 0


def test_log_prob_refuses_what_encode_refuses(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.LogProb(pb.LogProbRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence="MKT"),
                                                                 pb.SequenceItem(sequence="MK<mask>T")]))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "items[1].sequence: <mask> is only accepted by predict" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.LogProb(pb.LogProbRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence="A" * 2049)]))
    assert "2049 residues; at most 2048" in caught.value.details()


def test_log_prob_json_is_biolms_shape_and_errors_are_encodes(gateway, reference_models):
    url = gateway.url + "/api/v3/esm2-8m/log_prob/"
    response = requests.post(url, json={"items": [{"sequence": s} for s in LOG_PROB_SEQUENCES]}, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [set(r) for r in results] == [{"log_prob"}] * len(LOG_PROB_SEQUENCES)
    for sequence, result in zip(LOG_PROB_SEQUENCES, results):
        assert result["log_prob"] == pytest.approx(direct_log_prob(reference_models["esm2-8m"], sequence),
                                                   rel=1e-5, abs=1e-4)
    bad = requests.post(url, json={"items": [{"sequence": "MKT"}, {"sequence": "MK1T"}]}, timeout=60)
    assert bad.status_code == 400
    error = bad.json()
    assert error["errors"] == [{"index": 1, "field": "items[1].sequence",
                                "detail": "invalid character '1' at position 3; allowed: ACDEFGHIKLMNPQRSTVWY, "
                                          "BXZUO and '-'"}]
    extra = requests.post(url, json={"items": [{"sequence": "MKT"}], "params": {}}, headers=JSON, timeout=60)
    assert extra.status_code == 400 and "unknown field 'params'" in extra.json()["detail"]
    schema = requests.get(gateway.url + "/api/v3/schema/esm2-8m/log_prob/", timeout=60).json()
    assert schema["properties"]["items"]["maxItems"] == 8 and "params" not in schema["properties"]
    unknown = requests.get(gateway.url + "/api/v3/schema/esm2-8m/fold/", timeout=60)
    assert unknown.status_code == 404 and "use encode, predict, log_prob, score" in unknown.json()["detail"]


def test_biolmai_client_reads_log_prob_results(gateway, server, reference_models, tmp_path):
    """BioLM's own client, unchanged, calling action log_prob on 11 items (two batches of maxItems=8)."""
    sequences = ["MKTAYIAKQR"[: 3 + i] for i in range(8)] + ["MLKXVW", "ACDEFGHIKLMNPQRSTVWY", "W"]
    script = f"""
import json
from biolmai.core.http import BioLMApi
api = BioLMApi("esm2-8m", retry_error_batches=False)
out = api._batch_call_autoschema_or_manual("log_prob", {[{"sequence": s} for s in sequences]!r})
print(json.dumps(out))
"""
    env = {**os.environ, "BIOLMAI_BASE_API_URL": gateway.url + "/api/v3", "BIOLMAI_TOKEN": "unused-no-keys-configured",
           "BIOLMAI_THREADS": "2", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out) == len(sequences)
    for sequence, result in zip(sequences, out):
        assert result["log_prob"] == pytest.approx(direct_log_prob(reference_models["esm2-8m"], sequence),
                                                   rel=1e-5, abs=1e-4)


# ---- Score --------------------------------------------------------------------------------------
def test_masked_marginals_equal_direct(stub, reference_models):
    response = stub.Score(score_request("esm2-8m", [(WILD_TYPE, VARIANTS)]))
    (result,) = response.results
    want = [direct_masked_marginal(reference_models["esm2-8m"], WILD_TYPE, v) for v in VARIANTS]
    assert list(result.scores) == pytest.approx(want, abs=1e-4)
    assert result.scores[-1] == 0.0  # M1M: no change
    assert not result.HasField("pseudo_log_likelihood") and not result.variant_pseudo_log_likelihoods


def test_wt_marginals_equal_direct(stub, reference_models):
    response = stub.Score(score_request("esm2-8m", [(WILD_TYPE, VARIANTS), ("MLKXVW", ["L2W"])], "wt_marginal"))
    loaded = reference_models["esm2-8m"]
    assert list(response.results[0].scores) == pytest.approx(
        [direct_wt_marginal(loaded, WILD_TYPE, v) for v in VARIANTS], abs=1e-4)
    assert list(response.results[1].scores) == pytest.approx([direct_wt_marginal(loaded, "MLKXVW", "L2W")], abs=1e-4)


def test_pseudo_log_likelihoods_equal_direct(stub, reference_models):
    items = [("MKTAYIAKQR", ["K2A", "T3G:A4C"]), ("MLKXVW", [])]  # X is not scored
    response = stub.Score(score_request("esm2-tiny", items, "pll"))
    loaded = reference_models["esm2-tiny"]
    for (sequence, variants), result in zip(items, response.results):
        wild = direct_pll(loaded, sequence)
        mutants = [direct_pll(loaded, mutant_of(sequence, v)) for v in variants]
        assert result.pseudo_log_likelihood == pytest.approx(wild, abs=1e-4)
        assert result.scored_positions == sum(a in COLUMN for a in sequence)
        assert list(result.variant_pseudo_log_likelihoods) == pytest.approx(mutants, abs=1e-4)
        assert list(result.scores) == pytest.approx([m - wild for m in mutants], abs=1e-4)


def test_passes_merge_and_repeats_come_from_the_cache(server, stub):
    """A saturation scan costs one pass per position; the same scan again costs none; pll's
    mutants share the wild type's pass at their mutated position."""
    rng = random.Random(20)
    wild_type = "".join(rng.choice(AMINO) for _ in range(12))  # new to this server: nothing cached
    scan = [f"{a}{p}{b}" for p, a in enumerate(wild_type, 1) for b in AMINO if b != a]
    before = items_run(server, "esm2-tiny")
    first = stub.Score(score_request("esm2-tiny", [(wild_type, scan)]))
    assert items_run(server, "esm2-tiny") - before == 12
    again = stub.Score(score_request("esm2-tiny", [(wild_type, scan)]))
    assert items_run(server, "esm2-tiny") - before == 12 and again == first
    # the scan's passes are predict's: a masked predict of this wild type is answered from the cache
    stub.Predict(pb.PredictRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence="<mask>" + wild_type[1:])]))
    assert items_run(server, "esm2-tiny") - before == 12
    # pll of the wild type: its 12 passes are the scan's, cached; K single mutants add 11 each
    before = items_run(server, "esm2-tiny")
    stub.Score(score_request("esm2-tiny", [(wild_type, scan[:3])], "pll"))
    assert items_run(server, "esm2-tiny") - before == 3 * 11


def test_score_problems_name_item_variant_and_field(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(score_request("esm2-tiny", [("MKTAY", ["K2A", "K3A", "A4"]), ("MK-X", ["X4A"])], "best"))
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = error.details()
    assert "items[0].variants[1]: 'K3A': the wild type at position 3 is T, not K" in details
    assert "items[0].variants[2]: 'A4': 'A4' is not a mutation like A23G" in details
    assert "items[1].variants[0]: 'X4A': wild type X is not one of the 20 standard amino acids" in details
    assert "params.method: unknown value 'best'; allowed: masked_marginal, wt_marginal, pll" in details


def test_score_json_equals_grpc_and_names_problems(gateway, stub):
    url = gateway.url + "/api/v3/esm2-8m/score/"
    body = {"params": {"method": "wt_marginal"}, "items": [{"sequence": WILD_TYPE, "variants": VARIANTS}]}
    response = requests.post(url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    want = stub.Score(score_request("esm2-8m", [(WILD_TYPE, VARIANTS)], "wt_marginal")).results[0]
    assert response.json()["results"] == [{"sequence_index": 0, "scores": pytest.approx(list(want.scores), abs=1e-12)}]
    pll = requests.post(url, json={"params": {"method": "pll"}, "items": [{"sequence": "MKTAY"}]}, timeout=60).json()
    assert set(pll["results"][0]) == {"sequence_index", "scores", "pseudo_log_likelihood", "scored_positions",
                                      "variant_pseudo_log_likelihoods"}
    bad = requests.post(url, json={"items": [{"sequence": "MKTAY", "variants": ["K2A", "k3a"]}]}, timeout=60)
    assert bad.status_code == 400
    assert bad.json()["errors"] == [{"index": 0, "field": "items[0].variants[1]",
                                     "detail": "'k3a': 'k3a' is not a mutation like A23G (wild type, 1-based "
                                               "position, mutant)"}]
    schema = requests.get(gateway.url + "/api/v3/schema/esm2-8m/score/", timeout=60).json()
    assert schema["properties"]["params"]["properties"]["method"]["enum"] == ["masked_marginal", "wt_marginal", "pll"]


# Text outside the grammar (ASCII capitals and digits, ':' between mutations) that scored as
# K2A or K2A:T3G before issue 32: other scripts' digits, and whitespace.
OUTSIDE_THE_GRAMMAR = ["K\u0662A", "K\uff12A", "K\u09e8A", " K2A", "K2A : T3G", "K2A\t:T3G"]


def test_variants_outside_the_grammar_are_refused_naming_variant_and_index(gateway, stub):
    variants = ["K2A", *OUTSIDE_THE_GRAMMAR]
    wanted = [(f"items[0].variants[{number}]", f"{ascii(text)}: ") for number, text in enumerate(variants) if number]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(score_request("esm2-8m", [("MKTAY", variants)]))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    for field, shown in wanted:
        assert f"{field}: {shown}" in caught.value.details()
    response = requests.post(gateway.url + "/api/v3/esm2-8m/score/", timeout=60,
                             json={"items": [{"sequence": "MKTAY", "variants": variants}]})
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert [(e["field"], e["index"]) for e in errors] == [(field, 0) for field, _ in wanted]
    assert all(e["detail"].startswith(shown) and "is not a mutation like A23G" in e["detail"]
               for e, (_, shown) in zip(errors, wanted))


def test_a_hostile_body_of_variants_is_refused_by_its_mutation_count(gateway):
    """Issue 32's request: 280 variants of 2,048 mutations each, 3.7 MB; refused by counting its
    ':', as tests/unit/test_variant_bounds.py shows without parsing the JSON or any variant."""
    wild_type = (AMINO * 103)[:2048]
    variant = ":".join(f"{a}{p}{'A' if a != 'A' else 'C'}" for p, a in enumerate(wild_type, start=1))
    body = {"params": {"method": "wt_marginal"}, "items": [{"sequence": wild_type, "variants": [variant] * 280}]}
    response = requests.post(gateway.url + "/api/v3/esm2-8m/score/", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == (
        "items: the body holds 573165 ':', more than a request within --max-score-mutations (10000 mutations) can "
        "hold (10019: one after each key, one between two mutations): split the variants over several requests")


# ---- bounds -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bounded(tmp_path_factory, tiny_checkpoint):
    """Small Score bounds; esm2-q has a small queue, which caps a request's passes too."""
    tmp = tmp_path_factory.mktemp("bounded")
    models = tmp / "models.toml"
    models.write_text(f'[models.esm2-tiny]\nsource = "{tiny_checkpoint}"\n'
                      f'[models.esm2-q]\nsource = "{tiny_checkpoint}"\nmax_queue_items = 10\n')
    server = ServerProcess(tmp, "--models-file", str(models), "--max-score-passes", "12",
                           "--max-score-mutations", "6").wait_ready()
    yield server
    server.stop()


def _refusal(server, request) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Score(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details()


def test_score_bounds_are_refused_naming_them(bounded, tmp_path):
    stub = bounded.stub
    at_cap = stub.Score(score_request("esm2-tiny", [("MKTAYIAKQRQI", ["K2A", "T3G", "A4C", "Y5W", "I6L", "A7G"])]))
    assert len(at_cap.results[0].scores) == 6
    assert "7 mutations in one request; at most 6 are allowed (--max-score-mutations)" in _refusal(
        bounded, score_request("esm2-tiny", [("MKTAYIAKQRQI", ["K2A:T3G:A4C", "Y5W:I6L:A7G", "K8A"])]))
    pll_cost = _refusal(bounded, score_request("esm2-tiny", [("MKTAYIA", ["K2A"])], "pll"))
    assert "the request needs 14 forward passes (pll); at most 12 are allowed (--max-score-passes)" in pll_cost
    stub.Score(score_request("esm2-tiny", [("MKTAYI", ["K2A"])], "pll"))  # 12 passes: allowed
    queue_cost = _refusal(bounded, score_request("esm2-q", [("MKTAYIAKQRQI", [])], "pll"))
    assert "needs 12 forward passes (pll); at most 10 are allowed (--max-queue-items)" in queue_cost
    info = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert (info["esm2-tiny"].max_score_passes, info["esm2-q"].max_score_passes) == (12, 10)
    assert info["esm2-tiny"].max_score_mutations == 6
    envoy = start_gateway(tmp_path, bounded.port)
    try:
        response = requests.post(envoy.url + "/api/v3/esm2-tiny/score/", timeout=60, json={
            "items": [{"sequence": "MKTAY", "variants": ["K2A"] * 4}, {"sequence": "MKTAY", "variants": ["K2A"] * 3}]})
        assert response.status_code == 400
        assert "7 mutations in one request; at most 6 are allowed (--max-score-mutations)" in \
            response.json()["detail"]
        schema = requests.get(envoy.url + "/api/v3/schema/esm2-tiny/score/", timeout=60).json()
        assert schema["properties"]["items"]["items"]["properties"]["variants"]["maxItems"] == 6
    finally:
        envoy.stop()


def test_client_splits_work_into_requests_within_the_bounds(bounded, reference_models):
    """esm2 score's library: 14 mutated positions and 14 mutations over a 12-pass, 6-mutation server;
    PLLs of 3 sequences of 7 scored positions each over 12 passes per request."""
    from esm2_client.client import Esm2Client
    from esm2_client import scoring

    wild_type = "MKTAYIAKQRQISFVK"
    variants = ["M1A", "K2A:T3G", "A4C", "Y5W:I6L:A7G", "K8A", "Q9W", "R10K", "Q11A", "I12L", "S13T:F14Y"]
    loaded = reference_models["esm2-tiny"]
    before = bounded.metrics()
    with Esm2Client(bounded.target, max_in_flight=2) as client:
        scores = scoring.masked_marginal_scores(client, "esm2-tiny", wild_type, variants)
        sequences = ["MKTAYIA", "MLKXVWAC", "WWWWWWW"]
        likelihoods = list(scoring.pseudo_log_likelihoods(client, "esm2-tiny", sequences))
    assert scores == pytest.approx([direct_masked_marginal(loaded, wild_type, v) for v in variants], abs=1e-4)
    for sequence, result in zip(sequences, likelihoods):
        assert result.scored_positions == 7
        assert result.pseudo_log_likelihood == pytest.approx(direct_pll(loaded, sequence), abs=1e-4)
    requests_made = bounded.metrics()['esm_requests_total{code="OK",method="Score"}'] - before.get(
        'esm_requests_total{code="OK",method="Score"}', 0)
    assert requests_made == 3 + 3  # mutations 4 + 6 + 4 (3 requests); PLLs 7 + 7 + 7 passes (3 requests)


def test_clients_log_prob_and_score_sync_and_async(server, reference_models):
    """Esm2Client and AsyncEsm2Client: log_prob over more items than one request holds, and score."""
    import asyncio

    from esm2_client.client import AsyncEsm2Client, Esm2Client

    sequences = [WILD_TYPE[: 3 + i] for i in range(11)]  # two requests of at most 8
    want = [direct_log_prob(reference_models["esm2-tiny"], s) for s in sequences]
    with Esm2Client(server.target) as client:
        assert client.log_prob("esm2-tiny", sequences) == pytest.approx(want, rel=1e-5, abs=1e-4)
        blocking = client.score("esm2-tiny", [(WILD_TYPE, VARIANTS)], "wt_marginal")

    async def run():
        async with AsyncEsm2Client(server.target) as client:
            return await client.log_prob("esm2-tiny", sequences), await client.score(
                "esm2-tiny", [(WILD_TYPE, VARIANTS)], "wt_marginal")
    values, awaited = asyncio.run(run())
    assert values == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert list(awaited[0].scores) == list(blocking[0].scores) == pytest.approx(
        [direct_wt_marginal(reference_models["esm2-tiny"], WILD_TYPE, v) for v in VARIANTS], abs=1e-4)
