"""esm2_client against a real server: values, order, stream dtypes, retries, deadlines, keys."""

from __future__ import annotations

import asyncio
import random
import threading

import grpc
import numpy as np
import pytest
from support import free_port, start_server
from reference import assert_close, reference

from esm2_client import AsyncEsm2Client, Esm2Client, Esm2Error, RetryPolicy
from esm2_wire import chunks
from esm2_wire.proto import pb

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def random_sequences(count: int, low: int, high: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(AMINO) for _ in range(rng.randint(low, high))) for _ in range(count)]


@pytest.fixture(scope="module")
def client(server):
    with Esm2Client(server.target, max_in_flight=2) as c:
        yield c


def test_encode_splits_requests_and_keeps_order(client, reference_models):
    sequences = random_sequences(11, 5, 60, seed=1)  # more than max_items (8): two requests
    outputs = client.encode("esm2-tiny", sequences, include=["mean", "per_token", "bos", "contacts", "attentions",
                                                             "logits"], repr_layers=[-1, 0])
    assert len(outputs) == len(sequences)
    for index, (sequence, out) in enumerate(zip(sequences, outputs)):
        expected = reference(reference_models["esm2-tiny"], sequence)
        assert out.length == len(sequence)
        assert sorted(out.mean) == sorted(out.bos) == sorted(out.per_token) == [0, 2]
        for layer in (0, 2):
            assert_close(out.mean[layer], expected["mean"][layer], f"item {index} mean {layer}")
            assert_close(out.bos[layer], expected["bos"][layer], f"item {index} bos {layer}")
            assert_close(out.per_token[layer], expected["per_token"][layer], f"item {index} per_token {layer}")
        for name in ("contacts", "attentions", "logits"):
            assert_close(getattr(out, name), expected[name], f"item {index} {name}")
        assert "".join(out.vocab_tokens) == "LAGVSERTIDPKQNFYMHWC"


def test_predict_logits_match_fair_esm(client, reference_models):
    sequences = ["MKT<mask>AYIAKQR", "<mask>LKV<mask>"]
    outputs = client.predict("esm2-tiny", sequences)
    for sequence, out in zip(sequences, outputs):
        assert_close(out.logits, reference(reference_models["esm2-tiny"], sequence)["logits"], sequence)
    assert outputs[1].sequence_tokens == ["<mask>", "L", "K", "V", "<mask>"]


# ---- one language: (model, ...) everywhere, the old order deprecated, typed results ---------------------
def test_the_old_argument_order_still_works_with_a_deprecation_warning(client):
    sequences = ["MKTAYIAK", "MLKV"]
    want = client.encode("esm2-tiny", sequences)
    with pytest.warns(DeprecationWarning, match=r"encode\(sequences, model\) is deprecated: call encode\(model, "
                                                r"sequences\); the old order is removed in 0\.3\.0"):
        old = client.encode(sequences, "esm2-tiny")
    for a, b in zip(want, old):
        np.testing.assert_array_equal(a.mean[2], b.mean[2])
    with pytest.warns(DeprecationWarning):
        assert client.log_prob(sequences, model="esm2-tiny") == client.log_prob("esm2-tiny", sequences)
    with pytest.warns(DeprecationWarning):
        iterated = [index for index, _ in client.predict_iter(["MK<mask>A"], "esm2-tiny")]
    assert iterated == [0]

    async def run():
        async with AsyncEsm2Client(client.target) as aclient:
            with pytest.warns(DeprecationWarning, match=r"predict\(sequences, model\)"):
                return await aclient.predict(["MK<mask>A"], "esm2-tiny")
    np.testing.assert_array_equal(asyncio.run(run())[0].logits, client.predict("esm2-tiny", ["MK<mask>A"])[0].logits)
    # One sequence given as a string would be read letter by letter: refused, saying how to pass it.
    with pytest.raises(TypeError, match=r"sequences is a list of sequences, not one string: pass \['MKTAY'\]"):
        client.encode("esm2-tiny", "MKTAY")


def test_score_returns_typed_numpy_results_with_provenance_and_short_reprs(client):
    info = client.model_info("esm2-tiny")
    (masked,) = client.score("esm2-tiny", [("MKTAYIAK", ["K2A", "T3G:A4C", "M1L"])])
    assert masked.scores.dtype == np.float64 and masked.scores.shape == (3,)
    assert masked.pseudo_log_likelihood is None and masked.variant_pseudo_log_likelihoods is None
    assert masked.provenance == client.provenance("esm2-tiny")
    assert masked.provenance.weights_fingerprint == info.weights_fingerprint and masked.provenance.random_weights
    (pll,) = client.score("esm2-tiny", [("MKTAYIAK", ["K2A"])], "pll")
    assert pll.scored_positions == 8 and isinstance(pll.pseudo_log_likelihood, float)
    assert pll.variant_pseudo_log_likelihoods.shape == (1,)
    assert pll.scores[0] == pytest.approx(pll.variant_pseudo_log_likelihoods[0] - pll.pseudo_log_likelihood)
    text = repr(pll)
    assert text.startswith("ScoreResult(sequence_index=0, scores=float64[1], pseudo_log_likelihood=")
    assert "variant_pseudo_log_likelihoods=float64[1]" in text and "provenance=Provenance(" in text
    outputs = client.encode("esm2-tiny", ["MKTAYIAK"], include=["mean", "contacts", "logits"])[0]
    assert repr(outputs) == ("ItemOutputs(mean={2: float32[64]}, contacts=float32[8, 8], logits=float32[8, 20], "
                             "length=8, vocab_tokens=<20 str>)")


@pytest.mark.parametrize("data_type", [pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16])
def test_half_precision_streams_decode_exactly(client, data_type):
    sequences = random_sequences(3, 300, 400, seed=2)
    full = client.encode("esm2-tiny", sequences, include=["per_token", "contacts"], repr_layers=[-1])
    half = client.encode("esm2-tiny", sequences, include=["per_token", "contacts"], repr_layers=[-1],
                         data_type=data_type)
    for f, h in zip(full, half):
        for wide, narrow in ((f.per_token[2], h.per_token[2]), (f.contacts, h.contacts)):
            wire = chunks.to_wire(wide, data_type)  # what the server sent: exact expected values
            expected = wire.astype(np.float32) if data_type == pb.DATA_TYPE_FLOAT16 else (
                wire.astype(np.uint32) << 16).view(np.float32)
            assert narrow.dtype == np.float32
            np.testing.assert_array_equal(narrow, expected)


def test_async_client_matches_sync(server, client):
    sequences = random_sequences(10, 5, 40, seed=3)

    async def run():
        async with AsyncEsm2Client(server.target, max_in_flight=3) as aclient:
            encoded = await aclient.encode("esm2-tiny", sequences, include=["mean", "per_token"])
            predicted = await aclient.predict("esm2-tiny", ["MK<mask>AY"])
            return encoded, predicted

    encoded, predicted = asyncio.run(run())
    for a, s in zip(encoded, client.encode("esm2-tiny", sequences, include=["mean", "per_token"])):
        np.testing.assert_array_equal(a.mean[2], s.mean[2])
        np.testing.assert_array_equal(a.per_token[2], s.per_token[2])
    np.testing.assert_array_equal(predicted[0].logits, client.predict("esm2-tiny", ["MK<mask>AY"])[0].logits)


def test_invalid_argument_is_not_retried_and_names_the_input(server, client):
    before = server.metric("esm_requests_total", 'code="INVALID_ARGUMENT",method="EncodeStream"')
    sequences = random_sequences(10, 5, 10, seed=4)
    sequences[9] = "MKT*Y"
    with pytest.raises(Esm2Error) as info:
        Esm2Client(server.target, max_in_flight=1).encode("esm2-tiny", sequences)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "sequences[9].sequence: invalid character '*' (a stop codon: strip it) at position 4" in str(info.value)
    after = server.metric("esm_requests_total", 'code="INVALID_ARGUMENT",method="EncodeStream"')
    assert after - before == 1


def test_unknown_model_names_served_models(client):
    with pytest.raises(Esm2Error, match="model 'esm2-3b' is not served by .*served models: esm2-8m, esm2-tiny"):
        client.encode("esm2-3b", ["MKT"])


def test_deadline_stops_retrying():
    retry = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2)
    with Esm2Client(f"127.0.0.1:{free_port()}", retry=retry) as down:
        with pytest.raises(Esm2Error) as info:
            down.encode("esm2-tiny", ["MKT"], timeout=1.0)
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_retries_until_a_late_server_is_up_and_sends_the_api_key(tmp_path, tiny, reference_models):
    """The call starts while nothing listens; the server (API keys required) comes up later."""
    port = free_port()
    retry = RetryPolicy(max_attempts=60, initial_backoff=0.1, max_backoff=0.5)
    late: dict = {}

    def start_late():  # listen where the client already dials
        late["server"] = start_server(tmp_path, models=tiny, env={"ESM_API_KEYS": "sesame"}, port=port, ready=False)

    timer = threading.Timer(1.0, start_late)
    timer.start()
    try:
        with Esm2Client(f"127.0.0.1:{port}", api_key="sesame", retry=retry) as c:
            outputs = c.encode("esm2-tiny", ["MKTAYIAKQR"], timeout=60)
            assert_close(outputs[0].mean[2], reference(reference_models["esm2-tiny"], "MKTAYIAKQR")["mean"][2])
        with Esm2Client(f"127.0.0.1:{port}", api_key="wrong") as c:
            with pytest.raises(Esm2Error) as info:
                c.encode("esm2-tiny", ["MKT"])
        assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in str(info.value)
    finally:
        timer.join()
        late["server"].stop()


def test_out_of_memory_is_not_retried(server_factory, tiny):
    """RESOURCE_EXHAUSTED without `retry-after` (one sequence too large for the device) fails at once."""
    small = server_factory("--simulate-oom-above-tokens", "60", models=tiny)
    labels = 'code="RESOURCE_EXHAUSTED",method="EncodeStream"'
    with Esm2Client(small.target, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01)) as c, \
            pytest.raises(Esm2Error) as info:
        c.encode("esm2-tiny", ["A" * 100])
    attempts = small.metric("esm_requests_total", labels)
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "100-residue sequence does not fit in cpu memory" in str(info.value)
    assert attempts == 1


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("esm2-client")]


def test_leaving_encode_iter_early_stops_its_requests(server):
    sequences = random_sequences(48, 200, 300, seed=5)  # 6 requests on esm2-8m
    with Esm2Client(server.target, max_in_flight=3) as c:
        results = c.encode_iter("esm2-8m", sequences)
        assert next(results)[0] == 0
        results.close()
        assert _client_threads() == []  # cancelled and joined, not left running
        assert len(c.encode("esm2-8m", sequences[:2])) == 2  # the client still works


def test_leaving_async_encode_iter_early_ends_its_tasks(server):
    sequences = random_sequences(48, 200, 300, seed=6)

    async def run():
        async with AsyncEsm2Client(server.target, max_in_flight=3) as aclient:
            await aclient.model_info("esm2-8m")
            before = asyncio.all_tasks()
            results = aclient.encode_iter("esm2-8m", sequences)
            first = await results.__anext__()
            await results.aclose()
            left = asyncio.all_tasks() - before
            # aclose() itself waits for the client's request tasks; what may remain is gRPC's own
            # unwinding of the cancelled calls, which must end too: wait for it (bounded), not a clock.
            mine = [t for t in left if "_run.<locals>.one" in t.get_coro().__qualname__]
            _, pending = await asyncio.wait(left, timeout=60) if left else (set(), set())
            return first[0], mine, pending

    first, mine, pending = asyncio.run(run())
    assert first == 0 and mine == [] and pending == set()
