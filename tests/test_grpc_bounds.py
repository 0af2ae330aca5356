"""gRPC's request bounds equal the JSON API's (issue 16, attacks 6 and 7): params lists of at most
64 values and stream chunks of at least 64 KiB, refused with INVALID_ARGUMENT naming the field
before any per-entry work, while the caller next in line is answered as usual."""

from __future__ import annotations

import grpc
import pytest
from support import encode_request

from esm2_wire.proto import pb

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"


def refusal(call, request) -> str:
    with pytest.raises(grpc.RpcError) as info:
        for _ in call(request, timeout=60) if isinstance(request, pb.EncodeStreamRequest | pb.PredictStreamRequest) \
                else [call(request, timeout=60)]:
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


@pytest.mark.parametrize("rpc", ["Encode", "EncodeStream"])
@pytest.mark.parametrize("include, repr_layers, message", [
    ([], [-1] * 65, "params.repr_layers: at most 64 values, got 65"),
    ([], list(range(30_000)), "params.repr_layers: at most 64 values, got 30000"),  # a flood under the message cap
    (["mean"] * 65, [], "params.include: at most 64 values, got 65"),
    (["x" * 100] * 1000, [10**6] * 100,
     "params.include: at most 64 values, got 1000; params.repr_layers: at most 64 values, got 100"),
])
def test_params_lists_are_capped_as_in_json(stub, rpc, include, repr_layers, message):
    request = encode_request("esm2-tiny", [SEQUENCE], include, repr_layers)
    if rpc == "EncodeStream":
        request = pb.EncodeStreamRequest(model=request.model, params=request.params, items=request.items)
    details = refusal(getattr(stub, rpc), request)
    assert details == message  # only the count: no entry was looked at, none is echoed


def test_64_values_are_still_accepted(stub):
    response = stub.Encode(encode_request("esm2-tiny", [SEQUENCE], ["mean", "bos"] * 32, [0, -1] * 32), timeout=60)
    assert [e.layer for e in response.results[0].embeddings] == [0, 2]


@pytest.mark.parametrize("rpc", ["EncodeStream", "PredictStream"])
@pytest.mark.parametrize("size", [1, 4096, (64 << 10) - 1, -1])
def test_tiny_stream_chunks_are_refused(stub, rpc, size):
    options = pb.StreamOptions(max_chunk_bytes=size)
    items = [pb.SequenceItem(sequence=SEQUENCE if rpc == "EncodeStream" else "MK<mask>T")]
    request_type = pb.EncodeStreamRequest if rpc == "EncodeStream" else pb.PredictStreamRequest
    details = refusal(getattr(stub, rpc), request_type(model="esm2-tiny", items=items, stream_options=options))
    assert details == (f"stream_options.max_chunk_bytes: {size} is too small; at least 65536 "
                       "(0 means the default, 1048576)")


@pytest.mark.parametrize("size", [0, 64 << 10])
def test_the_default_and_the_smallest_chunk_are_accepted(stub, size):
    request = pb.EncodeStreamRequest(model="esm2-tiny", params=pb.EncodeParams(include=["per_token"]),
                                     items=[pb.SequenceItem(sequence=SEQUENCE)],
                                     stream_options=pb.StreamOptions(max_chunk_bytes=size))
    chunks = [m.chunk for m in stub.EncodeStream(request, timeout=60) if m.WhichOneof("payload") == "chunk"]
    assert len(chunks) == 1 and chunks[0].shape == [len(SEQUENCE), 64]
