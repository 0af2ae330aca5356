"""Every validation rule: INVALID_ARGUMENT / NOT_FOUND naming the item, field and problem."""

import grpc
import pytest

from support import encode_request
from esm2_wire.proto import pb


def rejection(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), info.value.details()


def predict_request(sequences, model="esm2-tiny"):
    return pb.PredictRequest(model=model, items=[pb.SequenceItem(sequence=s) for s in sequences])


@pytest.mark.parametrize(
    "sequences,include,layers,message",
    [
        ([], [], [], "items: expected 1 to 8 items, got 0"),
        (["MK"] * 9, [], [], "items: expected 1 to 8 items, got 9"),
        (["MK", ""], [], [], "items[1].sequence: must not be empty"),
        (["MKJ"], [], [], "items[0].sequence: invalid character 'J' at position 3"),
        (["MKa"], [], [], "items[0].sequence: invalid character lowercase letter 'a' (use upper case) at position 3"),
        (["MK A"], [], [], "items[0].sequence: invalid character whitespace ' ' at position 3"),
        (["M", "MK<pad>"], [], [], "items[1].sequence: invalid character '<' at position 3"),
        (["MK<cls>"], [], [], "items[0].sequence: invalid character '<'"),
        (["MK.A"], [], [], "items[0].sequence: invalid character '.'"),
        (["MK<mask>"], [], [], "items[0].sequence: <mask> is only accepted by predict"),
        (["A" * 2049], [], [], "items[0].sequence: 2049 residues; at most 2048 are allowed"),
        (["MK"], ["mean", "embeddings"], [], "params.include[1]: unknown value 'embeddings'; allowed: mean, per_token, bos, contacts, logits, attentions"),
        (["MK"], [], [3], "params.repr_layers[0]: layer 3 is out of range for esm2-tiny (2 layers); allowed: -3 to 2"),
        (["MK"], [], [-1, -4], "params.repr_layers[1]: layer -4 is out of range"),
    ],
)
def test_encode_rejections(stub, sequences, include, layers, message):
    code, details = rejection(stub.Encode, encode_request("esm2-tiny", sequences, include, layers))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_every_problem_is_reported_at_once(stub):
    _, details = rejection(stub.Encode, encode_request("esm2-tiny", ["MK1", "OK", ""], ["nope"], [9]))
    for part in ("items[0].sequence", "items[2].sequence: must not be empty", "params.include[0]",
                 "params.repr_layers[0]"):
        assert part in details
    assert "items[1]" not in details
    assert details.index("items[2]") < details.index("params.include[0]")


@pytest.mark.parametrize(
    "sequences,message",
    [
        (["MKTAY"], "items[0].sequence: must contain at least one <mask> token"),
        (["MK<mask>", "A-<mask>"], "items[1].sequence: invalid character '-' at position 2; allowed: ACDEFGHIKLMNPQRSTVWY, BXZUO and <mask> ('-' is not allowed in predict)"),
        (["MK<mas>"], "items[0].sequence: invalid character '<' at position 3"),
        (["<mask>" * 2049], "items[0].sequence: 2049 residues; at most 2048 are allowed"),
        (["<mask>m"], "items[0].sequence: invalid character lowercase letter 'm' (use upper case) at position 7"),
    ],
)
def test_predict_rejections(stub, sequences, message):
    code, details = rejection(stub.Predict, predict_request(sequences))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_predict_accepts_masks_at_the_length_limit(stub):
    response = stub.Predict(predict_request(["<mask>" * 2048]))
    assert len(response.results[0].sequence_tokens) == 2048


@pytest.mark.parametrize("call", ["Encode", "Predict", "EncodeStream"])
def test_unknown_model_is_not_found_and_lists_served_models(stub, call):
    request = {
        "Encode": encode_request("esm2-15b", ["MK"]),
        "Predict": predict_request(["M<mask>"], model="esm2-15b"),
        "EncodeStream": pb.EncodeStreamRequest(model="esm2-15b", items=[pb.SequenceItem(sequence="MK")]),
    }[call]
    method = getattr(stub, call)
    with pytest.raises(grpc.RpcError) as info:
        result = method(request)
        list(result) if call == "EncodeStream" else None
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "model 'esm2-15b' is not served here; served models: esm2-8m, esm2-tiny"


def test_server_keeps_serving_after_bad_input(stub):
    for _ in range(3):
        rejection(stub.Encode, encode_request("esm2-tiny", ["BAD1"]))
    assert len(stub.Encode(encode_request("esm2-tiny", ["MKT"])).results) == 1
