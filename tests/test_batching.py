"""Concurrent requests share batches, and each still gets exactly its own answer."""

import numpy as np
import torch
from reference import assert_close, matrix, reference

from support import encode_request
from esm2_wire.proto import pb

ALPHABET = list("ACDEFGHIKLMNPQRSTVWY")
OPTIONS = [
    (["mean"], [-1]),
    (["mean", "bos"], [0, 2]),
    (["per_token", "logits"], [1]),
    (["contacts"], []),
    (["attentions", "mean"], [-2]),
]


def test_fifty_concurrent_requests_each_get_their_own_result(server, reference_models):
    rng = np.random.default_rng(0)
    stub = server.stub
    items_before = server.metric("esm_items_total", 'model="esm2-tiny"')
    batches_before = server.metric("esm_batches_total", 'model="esm2-tiny"')
    calls = []
    for i in range(60):
        count = int(rng.integers(1, 4))
        sequences = ["".join(rng.choice(ALPHABET, int(rng.integers(5, 120)))) for _ in range(count)]
        if i % 6 == 5:
            masked = [s[:2] + "<mask>" + s[3:] for s in sequences]
            request = pb.PredictRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence=s) for s in masked])
            calls.append(("predict", masked, None, stub.Predict.future(request)))
        else:
            include, layers = OPTIONS[i % len(OPTIONS)]
            calls.append(("encode", sequences, (include, layers), stub.Encode.future(encode_request("esm2-tiny", sequences, include, layers))))

    ref_model = reference_models["esm2-tiny"]
    for kind, sequences, options, future in calls:
        response = future.result(timeout=120)
        assert len(response.results) == len(sequences)
        for index, (sequence, result) in enumerate(zip(sequences, response.results)):
            assert result.sequence_index == index
            ref = reference(ref_model, sequence)
            if kind == "predict":
                assert_close(matrix(result.logits), ref["logits"], "predict logits")
                continue
            include, layers = options
            absolute = list(dict.fromkeys(layer % 3 for layer in layers or [-1]))  # 2 layers: -1 -> 2
            for e in result.embeddings:
                assert_close(e.embedding, ref["mean"][e.layer])
            for e in result.bos_embeddings:
                assert_close(e.embedding, ref["bos"][e.layer])
            for e in result.per_token_embeddings:
                assert_close(matrix(e.embeddings), ref["per_token"][e.layer])
            if "mean" in include:
                assert [e.layer for e in result.embeddings] == absolute
            for key in ("contacts", "attentions", "logits"):
                assert result.HasField(key) == (key in include)
                if key in include:
                    assert_close(matrix(getattr(result, key)), ref[key], key)

    items = server.metric("esm_items_total", 'model="esm2-tiny"') - items_before
    batches = server.metric("esm_batches_total", 'model="esm2-tiny"') - batches_before
    assert items == sum(len(call[1]) for call in calls)
    assert batches < items / 2, "requests were not batched together"

