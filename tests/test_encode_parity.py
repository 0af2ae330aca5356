"""Every output of Encode and Predict equals a direct fair-esm forward pass of the sequence alone."""

import numpy as np
import pytest
from reference import INCLUDE_ALL, SEQUENCES, assert_close, check_result, matrix, reference

from support import encode_request
from esm2_wire.proto import pb

@pytest.mark.parametrize("model", ["esm2-tiny", "esm2-8m"])
def test_every_output_matches_fair_esm(stub, reference_models, model):
    response = stub.Encode(encode_request(model, SEQUENCES, INCLUDE_ALL, [-1, 0, 1]))
    n = reference_models[model].num_layers
    assert [r.sequence_index for r in response.results] == list(range(len(SEQUENCES)))
    for sequence, result in zip(SEQUENCES, response.results):
        ref = reference(reference_models[model], sequence)
        check_result(result, ref, [n, 0, 1], INCLUDE_ALL)
        assert matrix(result.contacts).shape == (len(sequence), len(sequence))
        assert matrix(result.logits).shape == (len(sequence), 20)
        attentions = matrix(result.attentions)
        assert attentions.min() >= 0 and attentions.max() <= 1
        contacts = matrix(result.contacts)
        assert contacts.min() >= 0 and contacts.max() <= 1


@pytest.mark.parametrize(
    "include,repr_layers,expected_layers",
    [
        ([], [], [2]),  # defaults: mean of the last layer
        (["mean"], [-3], [0]),  # -(n+1) is the embedding layer
        (["per_residue"], [2, -1, 1], [2, 1]),  # alias; duplicates collapse
        (["bos", "logits"], [0], [0]),
        (["contacts"], [], []),
        (["attentions", "mean"], [-2], [1]),
    ],
)
def test_include_and_repr_layers(stub, reference_models, include, repr_layers, expected_layers):
    response = stub.Encode(encode_request("esm2-tiny", SEQUENCES[:2], include, repr_layers))
    canonical = {"per_residue": "per_token"}
    wanted = {canonical.get(i, i) for i in include} or {"mean"}
    for sequence, result in zip(SEQUENCES, response.results):
        ref = reference(reference_models["esm2-tiny"], sequence)
        embedding_layers = expected_layers if wanted & {"mean", "bos", "per_token"} else []
        check_result(result, ref, embedding_layers, wanted)


def test_predict_matches_fair_esm(stub, reference_models):
    sequences = ["MK<mask>AYIAKQR", "<mask>CDEF<mask><mask>", "<mask>"]
    response = stub.Predict(
        pb.PredictRequest(model="esm2-8m", items=[pb.SequenceItem(sequence=s) for s in sequences])
    )
    for sequence, result in zip(sequences, response.results):
        ref = reference(reference_models["esm2-8m"], sequence, layers=[])
        tokens = list(result.sequence_tokens)
        assert tokens == reference_models["esm2-8m"].alphabet.tokenize(sequence)
        assert_close(matrix(result.logits), ref["logits"], "predict logits")
        assert matrix(result.logits).shape == (len(tokens), 20)
        assert list(result.vocab_tokens) == list("LAGVSERTIDPKQNFYMHWC")


def test_exact_attention_server_matches_fair_esm(server_factory, tiny, reference_models):
    server = server_factory("--attention", "exact", models=tiny)
    response = server.stub.Encode(encode_request("esm2-tiny", SEQUENCES, ["mean", "per_token", "logits"], [0, 1, 2]))
    for sequence, result in zip(SEQUENCES, response.results):
        check_result(result, reference(reference_models["esm2-tiny"], sequence), [0, 1, 2], {"mean", "per_token", "logits"})


def test_long_sequence_at_the_limit(stub, reference_models):
    rng = np.random.default_rng(7)
    sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 2048))
    response = stub.Encode(encode_request("esm2-tiny", [sequence], ["mean", "contacts"]))
    ref = reference(reference_models["esm2-tiny"], sequence)
    check_result(response.results[0], ref, [2], {"mean", "contacts"})
