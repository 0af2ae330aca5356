"""Scheduling against a real server: small work overtakes huge work, two workers share one
model, and repeats are computed once (in flight and from the result cache), every answer
equal to its solo reference."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_close, matrix, reference

from esm2_wire.proto import pb
from support import encode_request, start_server, wait_for

ALPHABET = list("ACDEFGHIKLMNPQRSTVWY")
rng = np.random.default_rng(23)


def _random(length: int) -> str:
    return "".join(rng.choice(ALPHABET, length))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, checkpoint_dir, tiny):
    """Both models on two CPU workers, result cache on (the default)."""
    with start_server(tmp_path_factory.mktemp("two-workers"), "--device", "cpu,cpu",
                      models={**tiny, "esm2-8m": None}, model_dir=checkpoint_dir) as proc:
        yield proc


def _check_encode(result, ref, include, layers):
    for e in result.embeddings:
        assert e.layer in layers
        assert_close(e.embedding, ref["mean"][e.layer], "mean")
    for e in result.bos_embeddings:
        assert_close(e.embedding, ref["bos"][e.layer], "bos")
    for e in result.per_token_embeddings:
        assert_close(matrix(e.embeddings), ref["per_token"][e.layer], "per_token")
    for key in ("contacts", "attentions", "logits"):
        assert result.HasField(key) == (key in include)
        if key in include:
            assert_close(matrix(getattr(result, key)), ref[key], key)


def test_two_workers_serve_one_model_and_every_answer_equals_its_reference(two_workers, reference_models):
    server = two_workers
    worker = {w: server.metric("esm_worker_batches_total", f'device="cpu",worker="{w}"') for w in "01"}
    long_sequence = _random(1500)
    long_call = server.stub.Encode.future(encode_request("esm2-8m", [long_sequence], ["mean"], [-1]))
    wait_for(lambda: server.metric("esm_worker_busy") >= 1)  # one worker holds the long item
    options = [(["mean"], [-1]), (["per_token", "logits"], [1]), (["contacts", "bos"], [0]), (["attentions"], [])]
    calls = []
    for i in range(24):
        sequences = [_random(int(rng.integers(5, 90))) for _ in range(int(rng.integers(1, 4)))]
        include, layers = options[i % len(options)]
        request = encode_request("esm2-tiny", sequences, include, layers)
        calls.append((sequences, include, layers, server.stub.Encode.future(request)))
    for sequences, include, layers, future in calls:
        response = future.result(timeout=120)
        absolute = [layer % 3 for layer in layers] or [2]
        for sequence, result in zip(sequences, response.results, strict=True):
            _check_encode(result, reference(reference_models["esm2-tiny"], sequence), include, absolute)
    (long_result,) = long_call.result(timeout=300).results
    assert_close(long_result.embeddings[0].embedding, reference(reference_models["esm2-8m"], long_sequence)["mean"][6])
    done = {w: server.metric("esm_worker_batches_total", f'device="cpu",worker="{w}"') - worker[w] for w in "01"}
    assert done["0"] >= 1 and done["1"] >= 1, done  # the tiny requests ran beside the long one


INCLUDE_ALL = ["mean", "per_token", "bos", "logits", "contacts", "attentions"]


@pytest.mark.parametrize("include", [[kind] for kind in INCLUDE_ALL] + [INCLUDE_ALL])
def test_a_cached_answer_equals_a_fresh_one_and_the_reference(two_workers, reference_models, include):
    server = two_workers
    sequence = _random(40)
    request = encode_request("esm2-tiny", [sequence], include, [0, 2])
    hits, misses = server.metric("esm_cache_hits_total"), server.metric("esm_cache_misses_total")
    fresh = server.stub.Encode(request)
    cached = server.stub.Encode(request)
    assert server.metric("esm_cache_misses_total") - misses == 1
    assert server.metric("esm_cache_hits_total") - hits == 1
    assert cached.SerializeToString(deterministic=True) == fresh.SerializeToString(deterministic=True)
    _check_encode(cached.results[0], reference(reference_models["esm2-tiny"], sequence), include, [0, 2])
    # Other layers are another result: computed, not served from the cached one.
    other = server.stub.Encode(encode_request("esm2-tiny", [sequence], include, [1]))
    assert server.metric("esm_cache_misses_total") - misses == 2
    _check_encode(other.results[0], reference(reference_models["esm2-tiny"], sequence), include, [1])


def test_a_cached_prediction_and_stream_equal_fresh_ones(two_workers, reference_models):
    server = two_workers
    masked = _random(30)
    masked = masked[:5] + "<mask>" + masked[6:]
    request = pb.PredictRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence=masked)])
    fresh, cached = server.stub.Predict(request), server.stub.Predict(request)
    assert fresh.SerializeToString(deterministic=True) == cached.SerializeToString(deterministic=True)
    assert_close(matrix(cached.results[0].logits), reference(reference_models["esm2-tiny"], masked)["logits"])
    sequence = _random(50)
    stream = pb.EncodeStreamRequest(model="esm2-tiny", params=pb.EncodeParams(include=["per_token", "contacts"]),
                                    items=[pb.SequenceItem(sequence=sequence)])
    first = [m.SerializeToString(deterministic=True) for m in server.stub.EncodeStream(stream)]
    hits = server.metric("esm_cache_hits_total")
    second = [m.SerializeToString(deterministic=True) for m in server.stub.EncodeStream(stream)]
    assert server.metric("esm_cache_hits_total") - hits == 1
    assert first == second


def test_identical_items_in_flight_are_computed_once_even_when_a_caller_cancels(two_workers, reference_models):
    server = two_workers
    stub = server.stub
    # Both workers busy with long items of their own, so the repeats below all wait in the queue.
    blockers = [stub.Encode.future(encode_request("esm2-8m", [_random(1500)])) for _ in range(2)]
    wait_for(lambda: server.metric("esm_worker_busy") == 2)
    items = server.metric("esm_items_total", 'model="esm2-8m"')
    merged = server.metric("esm_cache_merged_total")
    sequence = _random(1500)  # as long as the blockers: nothing runs between their layers, it waits
    request = encode_request("esm2-8m", [sequence, sequence], ["mean", "logits"], [-1])
    calls = [stub.Encode.future(request) for _ in range(4)]
    wait_for(lambda: server.metric("esm_cache_merged_total") - merged == 7)  # 8 callers, 1 computation
    assert server.metric("esm_queue_items") == 1
    calls[0].cancel()  # one caller gives up; the others still get the shared result
    ref = reference(reference_models["esm2-8m"], sequence)
    for call in calls[1:]:
        for result in call.result(timeout=300).results:
            assert_close(result.embeddings[0].embedding, ref["mean"][6])
            assert_close(matrix(result.logits), ref["logits"])
    for call in blockers:
        call.result(timeout=300)
    assert server.metric("esm_items_total", 'model="esm2-8m"') - items == 2 + 1  # the blockers and one repeat


def test_a_small_request_finishes_while_a_huge_one_is_still_running(server_factory, checkpoint_dir, reference_models):
    # The huge request's items each run alone (the token-pair budget is set below two of
    # them), so the small one can go between them rather than wait for all three.
    server = server_factory("--max-batch-token-pairs", str(700 * 700), models={"esm2-8m": None},
                            model_dir=checkpoint_dir)
    huge = [_random(600) for _ in range(3)]
    huge_call = server.stub.Encode.future(
        encode_request("esm2-8m", huge, ["mean", "per_token", "bos", "logits", "contacts", "attentions"], [-1]))
    wait_for(lambda: server.metric("esm_worker_busy") == 1)
    small = _random(30)
    response = server.stub.Encode(encode_request("esm2-8m", [small]), timeout=300)
    assert not huge_call.done(), "the small request waited for the whole huge one"
    assert_close(response.results[0].embeddings[0].embedding, reference(reference_models["esm2-8m"], small)["mean"][6])
    for sequence, result in zip(huge, huge_call.result(timeout=300).results, strict=True):
        assert_close(matrix(result.contacts), reference(reference_models["esm2-8m"], sequence)["contacts"])
    assert server.metric("esm_batches_total", 'model="esm2-8m"') >= 2 + 4  # warm-up 2, then 3 huge + 1 small
