"""ScoreStream (issue 31): variant scores streamed per block of passes as they complete, equal to
Score's, through gRPC and through a real Envoy (ScoreStreamJson, newline-delimited JSON on a route
with an idle timeout instead of a total one)."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import random
import subprocess

import pytest
import requests
from reference import direct_masked_marginal, direct_pll, mutant_of, score_request

from esm2_wire.proto import pb

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def protein(seed: int, length: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(AMINO) for _ in range(length))


def shuffled_scan(sequence: str, positions, seed: int) -> list[str]:
    """Single mutants at `positions`, two multi-mutants spanning far-apart positions, in random order."""
    variants = [f"{sequence[p - 1]}{p}{'W' if sequence[p - 1] != 'W' else 'A'}" for p in positions]
    first, last = positions[0], positions[-1]
    variants += [f"{sequence[first - 1]}{first}G:{sequence[last - 1]}{last}G".replace(
        f"{sequence[first - 1]}{first}G", f"{sequence[first - 1]}{first}{'G' if sequence[first - 1] != 'G' else 'A'}")]
    random.Random(seed).shuffle(variants)
    return variants


def stream_request(items, method: str = "masked_marginal", model: str = "esm2-8m") -> pb.ScoreStreamRequest:
    return pb.ScoreStreamRequest(model=model, params=pb.ScoreParams(method=method),
                                 items=[pb.ScoreItem(sequence=s, variants=v) for s, v in items])


def collect(messages, items) -> tuple[list[dict], list[tuple[int, int]]]:
    """Per item {variant index: (score, pll)}, every variant exactly once; and each message's progress."""
    got = [{} for _ in items]
    wild = {}
    progress = []
    for message in messages:
        progress.append((message["passes_done"], message["passes_total"]))
        indexes = message.get("variant_indexes", [])
        assert indexes == sorted(indexes)  # request order within a message
        plls = message.get("variant_pseudo_log_likelihoods") or [None] * len(indexes)
        for number, score, pll in zip(indexes, message.get("scores", []), plls):
            assert number not in got[message["sequence_index"]], "a variant arrived twice"
            got[message["sequence_index"]][number] = (score, pll)
        if message.get("pseudo_log_likelihood") is not None:
            assert message["sequence_index"] not in wild
            wild[message["sequence_index"]] = (message["pseudo_log_likelihood"], message["scored_positions"])
    for found, (_, variants) in zip(got, items):
        assert sorted(found) == list(range(len(variants)))
    dones = [done for done, _ in progress]
    assert dones == sorted(dones) and progress[-1][0] == progress[-1][1]
    return [dict(found, wild=wild.get(index)) for index, found in enumerate(got)], progress


def grpc_messages(stream) -> list[dict]:
    out = []
    for message in stream:
        fields = {"passes_done": message.passes_done, "passes_total": message.passes_total,
                  "variant_indexes": list(message.variant_indexes), "scores": list(message.scores),
                  "variant_pseudo_log_likelihoods": list(message.variant_pseudo_log_likelihoods)}
        if message.variant_indexes or message.HasField("pseudo_log_likelihood"):
            fields["sequence_index"] = message.sequence_index
        if message.HasField("pseudo_log_likelihood"):
            fields.update(pseudo_log_likelihood=message.pseudo_log_likelihood,
                          scored_positions=message.scored_positions)
        out.append(fields)
    return out


def test_a_streamed_scan_arrives_in_blocks_and_equals_the_unary_scores(stub, reference_models):
    """40 mutated positions (40 passes, blocks of 16) and a multi-mutant over the first and last: the
    stream runs first and computes every pass; the unary Score then reads the same passes (cached),
    so every score must be equal to the last bit, and both equal fair-esm's."""
    sequence = protein(7, 120)
    positions = sorted(random.Random(7).sample(range(1, 121), 40))
    variants = shuffled_scan(sequence, positions, seed=8)
    items = [(sequence, variants)]
    found, progress = collect(grpc_messages(stub.ScoreStream(stream_request(items))), items)
    assert progress[-1] == (40, 40) and len(progress) >= 3  # 16, 32, 40 passes at least
    unary = stub.Score(score_request("esm2-8m", items, "masked_marginal")).results[0]
    assert [found[0][n][0] for n in range(len(variants))] == list(unary.scores)
    loaded = reference_models["esm2-8m"]
    for number in range(0, len(variants), 7):
        assert found[0][number][0] == pytest.approx(direct_masked_marginal(loaded, sequence, variants[number]),
                                                    abs=1e-4)


def test_streamed_pseudo_log_likelihoods_equal_the_unary_ones(stub, reference_models):
    items = [("MKTAYIAKQRQISF", ["K2A", "T3G:A4C", "F14W"]), ("MLKXVW", [])]  # the second: its wild type only
    found, _ = collect(grpc_messages(stub.ScoreStream(stream_request(items, "pll", "esm2-tiny"))), items)
    unary = stub.Score(score_request("esm2-tiny", items, "pll")).results
    for index, result in enumerate(unary):
        assert found[index]["wild"] == (result.pseudo_log_likelihood, result.scored_positions)
        variants = items[index][1]
        assert [found[index][n] for n in range(len(variants))] == list(
            zip(result.scores, result.variant_pseudo_log_likelihoods))
    loaded = reference_models["esm2-tiny"]
    assert found[0]["wild"][0] == pytest.approx(direct_pll(loaded, items[0][0]), abs=1e-4)
    assert found[0][1][1] == pytest.approx(direct_pll(loaded, mutant_of(items[0][0], "T3G:A4C")), abs=1e-4)


def test_stream_problems_are_refused_as_score_refuses_them(stub):
    import grpc

    with pytest.raises(grpc.RpcError) as refused:
        list(stub.ScoreStream(stream_request([("MKTAY", ["K2A", "Q3A"])])))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].variants[1]" in refused.value.details()


@pytest.fixture(scope="module")
def pass_seconds(server) -> float:
    """The worker's time for one 1,002-token pass of the 8M shape (esm_batch_seconds), which its cost
    model learns too."""
    labels = 'model="esm2-8m"'
    before = server.metric("esm_batch_seconds_sum", labels), server.metric("esm_batch_seconds_count", labels)
    sequence = protein(30, 1000)
    server.stub.Score(score_request("esm2-8m", [(sequence, [f"{sequence[p - 1]}{p}A" for p in (1, 2)])]))
    after = server.metric("esm_batch_seconds_sum", labels), server.metric("esm_batch_seconds_count", labels)
    assert after[1] - before[1] == 2
    return (after[0] - before[0]) / 2


def test_through_the_gateway_a_scan_longer_than_the_route_timeout_streams_to_its_end(
        server, stub, gateway_factory, pass_seconds):
    """A gateway whose requests may take 2 s in all: the unary JSON score of a scan of about 6 s of work
    is refused at once (400, naming the estimate and score_stream), while score_stream, on its route with
    only an idle timeout, streams it to the end, line by line, equal to the unary gRPC scores."""
    envoy = gateway_factory(server.port, request_timeout_s=2)
    sequence = protein(31, 1000)
    count = min(1000, math.ceil(6 / pass_seconds))
    positions = sorted(random.Random(31).sample(range(1, 1001), count))
    variants = shuffled_scan(sequence, positions, seed=32)
    body = {"params": {"method": "masked_marginal"}, "items": [{"sequence": sequence, "variants": variants}]}
    refused = requests.post(envoy.url + "/api/v3/esm2-8m/score/", json=body, timeout=60)
    assert refused.status_code == 400, refused.text
    assert "cannot finish before its deadline" in refused.json()["detail"]
    assert "esm.v1.Esm2Service/ScoreStream (JSON: POST /api/v3/esm2-8m/score_stream/)" in refused.json()["detail"]
    with requests.post(envoy.url + "/api/v3/esm2-8m/score_stream/", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    found, progress = collect(lines, [(sequence, variants)])
    assert progress[-1] == (count, count) and len(progress) >= math.ceil(count / 16)
    unary = stub.Score(score_request("esm2-8m", [(sequence, variants)], "masked_marginal")).results[0]
    assert [found[0][n][0] for n in range(len(variants))] == list(unary.scores)


# ---- the Python client and `esm2 score` ------------------------------------------------------------
def test_the_client_streams_a_scan_with_progress_and_equals_score(server):
    from esm2_client.client import AsyncEsm2Client, Esm2Client

    sequence = protein(40, 150)
    variants = shuffled_scan(sequence, sorted(random.Random(40).sample(range(1, 151), 36)), seed=41)
    seen = []
    with Esm2Client(server.target) as client:
        (streamed,) = client.score_stream("esm2-8m", [(sequence, variants)], "masked_marginal",
                                          progress=lambda done, total: seen.append((done, total)))
        (unary,) = client.score("esm2-8m", [(sequence, variants)], "masked_marginal")  # the same passes, cached
    assert list(streamed.scores) == list(unary.scores)
    assert seen[-1] == (36, 36) and [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 3
    assert streamed.provenance == unary.provenance is not None

    async def awaited():
        async with AsyncEsm2Client(server.target) as client:
            return await client.score_stream("esm2-8m", [(sequence, variants)], "masked_marginal")
    (streamed_async,) = asyncio.run(awaited())
    assert list(streamed_async.scores) == list(unary.scores)


def test_two_esm2_score_scans_at_once_stream_and_equal_the_unary_scores(server, tmp_path):
    """The issue's two-caller scan, smaller: two `esm2 score` runs of 40 positions each at once. Each
    goes through ScoreStream (40 passes >= STREAM_MIN_PASSES) with a progress bar on stderr, and every
    score equals the unary Score's."""
    from esm2_client.client import Esm2Client
    from esm2_client.scoring import STREAM_MIN_PASSES
    from support import ESM2_COMMAND

    streams_before = server.metric("esm_requests_total", 'code="OK",method="ScoreStream"')
    scans = []
    for seed in (50, 51):
        sequence = protein(seed, 160)
        variants = shuffled_scan(sequence, sorted(random.Random(seed).sample(range(1, 161), 40)), seed + 100)
        (tmp_path / f"{seed}.csv").write_text("mutant\n" + "".join(f"{v}\n" for v in variants))
        scans.append((seed, sequence, variants))
    assert 40 >= STREAM_MIN_PASSES
    runs = [subprocess.Popen([*ESM2_COMMAND, "score", "--sequence", sequence, "--mutations-csv", str(tmp_path / f"{seed}.csv"),
                              "-m", "esm2-8m", "--server", server.target, "-o", str(tmp_path / f"{seed}.out.csv")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed, sequence, _ in scans]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        assert "masked marginal: 100%" in stderr and "40/40 [" in stderr, stderr  # tqdm's bar, in passes
    assert server.metric("esm_requests_total", 'code="OK",method="ScoreStream"') - streams_before == 2
    with Esm2Client(server.target) as client:
        for seed, sequence, variants in scans:
            rows = list(csv.DictReader(open(tmp_path / f"{seed}.out.csv")))
            assert [row["mutant"] for row in rows] == variants
            (unary,) = client.score("esm2-8m", [(sequence, variants)], "masked_marginal")
            assert [row["masked_marginal_score"] for row in rows] == [f"{score:.6f}" for score in unary.scores]
