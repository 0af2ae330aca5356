"""Admission by estimated work (issue 31), on a real server and through a real Envoy: a request that
cannot finish before its deadline is refused at once, naming the estimate and the deadline, and no
model work runs for it."""

from __future__ import annotations

import math
import random
import re

import grpc
import pytest
import requests

from esm2_wire.proto import pb

AMINO = "ACDEFGHIKLMNPQRSTVWY"
MODEL = "esm2-8m"
LENGTH = 1000


def protein(seed: int, length: int = LENGTH) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(AMINO) for _ in range(length))


def scan(sequence: str, positions) -> list[str]:
    """One variant per position, each position masked alone (masked_marginal): one pass per position."""
    return [f"{sequence[p - 1]}{p}{'A' if sequence[p - 1] != 'A' else 'G'}" for p in positions]


def score_request(sequence: str, variants: list[str]) -> pb.ScoreRequest:
    return pb.ScoreRequest(model=MODEL, params=pb.ScoreParams(method="masked_marginal"),
                           items=[pb.ScoreItem(sequence=sequence, variants=variants)])


@pytest.fixture(scope="module")
def measured_pass(server) -> float:
    """Seconds of one 1,002-token pass of the 8M shape, as the server's worker measured it (and its
    cost model learned it): four passes, each a batch of its own under the CPU's 1,024-token budget."""
    def worker_time() -> tuple[float, float]:
        labels = f'model="{MODEL}"'
        return server.metric("esm_batch_seconds_sum", labels), server.metric("esm_batch_seconds_count", labels)

    sequence = protein(0)
    seconds, batches = worker_time()
    server.stub.Score(score_request(sequence, scan(sequence, [1, 2, 3, 4])))
    after_seconds, after_batches = worker_time()
    assert after_batches - batches == 4
    return (after_seconds - seconds) / 4


def _deadline_named(message: str) -> float:
    return float(re.search(r"its deadline is ([0-9.]+) s away", message).group(1))


def _work_done(server) -> float:
    return server.metric("esm_items_total", f'model="{MODEL}"')


def test_a_deadline_shorter_than_a_measured_pass_is_refused_at_once_with_the_estimate(server, measured_pass):
    sequence = protein(1)
    before = _work_done(server)
    deadline_ms = max(1, int(measured_pass * 1000 / 2))
    # Through Envoy a JSON call carries no gRPC deadline: the gateway's timeout comes as this header.
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Score(score_request(sequence, scan(sequence, range(1, 101))),
                          metadata=[("x-envoy-expected-rq-timeout-ms", str(deadline_ms))])
    assert refused.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    message = refused.value.details()
    assert "the request cannot finish before its deadline: its model work alone is estimated at" in message
    assert f"(100 forward passes of {MODEL} on cpu, {100 * 1002 * (1 + 1002 / 1024):,.0f} work units at" in message
    assert "measured from the batches run so far" in message
    assert 0 < _deadline_named(message) <= round(deadline_ms / 1000, 2)  # named to the hundredth
    assert f"use the streaming RPC esm.v1.Esm2Service/ScoreStream (JSON: POST /api/v3/{MODEL}/score_stream/), " \
           "which returns results as they complete, " \
           "split the work over smaller requests, or give a longer deadline" in message
    estimate = float(message.split("estimated at ")[1].split(" s")[0])
    assert estimate > 20 * measured_pass  # 100 passes, at the rate the server measured
    assert _work_done(server) == before  # refused before any model work
    assert server.metric("esm_admission_refused_total", f'model="{MODEL}",verdict="CANNOT_FINISH"') >= 1


def test_a_grpc_deadline_the_request_cannot_meet_is_refused_before_it_passes(server, measured_pass):
    """A real gRPC deadline of 5 s and a scan estimated at several times that: the server's refusal,
    not the client's own expiry, ends the call (so it came within the deadline) and nothing ran."""
    deadline_s = 5.0
    positions = min(LENGTH, math.ceil(4 * deadline_s / measured_pass))
    sequence = protein(2)
    before = _work_done(server)
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Score(score_request(sequence, scan(sequence, range(1, positions + 1))), timeout=deadline_s)
    assert refused.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"({positions} forward passes of {MODEL} on cpu" in refused.value.details()
    assert _work_done(server) == before


def test_through_the_gateway_the_route_timeout_is_the_deadline_and_the_refusal_is_a_400(
        server, measured_pass, gateway_factory):
    """Envoy passes its per-try timeout on (x-envoy-expected-rq-timeout-ms); the JSON caller gets a
    400 with the estimate, at once, instead of a 504 once the work has been done for nothing."""
    # The timeout is sized from the measured pass, so that one pass fits with room under load (a
    # fixed 2 s refused the one-pass request when two suites shared the CPU: 2.58 s estimated).
    timeout_s = max(2, math.ceil(6 * measured_pass))
    envoy = gateway_factory(server.port, per_try_timeout_s=timeout_s)
    positions = min(LENGTH, math.ceil(4 * timeout_s / measured_pass))
    sequence = protein(3)
    before = _work_done(server)
    response = requests.post(envoy.url + f"/api/v3/{MODEL}/score/", timeout=60, json={
        "params": {"method": "masked_marginal"}, "items": [{"sequence": sequence, "variants": scan(
            sequence, range(1, positions + 1))}]})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert f"({positions} forward passes of {MODEL} on cpu" in detail
    assert 0 < _deadline_named(detail) <= timeout_s  # the per-try timeout, less the time on the way
    assert _work_done(server) == before
    # A request that fits is served through the same route.
    small = requests.post(envoy.url + f"/api/v3/{MODEL}/score/", timeout=60, json={
        "items": [{"sequence": sequence, "variants": scan(sequence, [1])}]})
    assert small.status_code == 200, small.text
