"""Streaming RPCs: chunks under 4 MiB that reassemble exactly into the unary outputs."""

import grpc
import numpy as np
import pytest
from reference import assert_close, matrix, reference

from support import encode_request
from service.models.checkpoints import load
from esm2_wire.proto import pb, pb_grpc
from service.models.random_checkpoints import write_random_checkpoint

SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ" * 5, "ACDEFGHIKLMNPQRSTVWY", "MKV"]
ALL = ["mean", "per_token", "bos", "contacts", "logits", "attentions"]
KIND_NAMES = {
    pb.OUTPUT_KIND_MEAN: "mean", pb.OUTPUT_KIND_BOS: "bos", pb.OUTPUT_KIND_PER_TOKEN: "per_token",
    pb.OUTPUT_KIND_CONTACTS: "contacts", pb.OUTPUT_KIND_ATTENTIONS: "attentions", pb.OUTPUT_KIND_LOGITS: "logits",
}
WIRE = {pb.DATA_TYPE_FLOAT32: "<f4", pb.DATA_TYPE_FLOAT16: "<f2", pb.DATA_TYPE_BFLOAT16: "<u2"}


def reassemble(messages):
    """{index: {"header": ItemHeader, (kind, layer): float32 array}}, checking row coverage."""
    items, rows_seen, current = {}, {}, None
    for message in messages:
        if message.WhichOneof("payload") == "item_header":
            current = message.item_header.sequence_index
            items[current] = {"header": message.item_header}
            continue
        chunk = message.chunk
        assert chunk.sequence_index == current, "chunk outside its item"
        key = (KIND_NAMES[chunk.output], chunk.layer if chunk.HasField("layer") else None)
        shape = tuple(chunk.shape)
        if key not in items[current]:
            items[current][key] = np.full(shape, np.nan, dtype=np.float32)
        part = np.frombuffer(chunk.data, dtype=WIRE[chunk.data_type]).reshape((chunk.row_count, *shape[1:]))
        if chunk.data_type == pb.DATA_TYPE_BFLOAT16:
            part = (part.astype("<u4") << 16).view("<f4")
        items[current][key][chunk.row_start : chunk.row_start + chunk.row_count] = part
        rows_seen.setdefault((current, key), []).append((chunk.row_start, chunk.row_count))
    for (index, key), spans in rows_seen.items():
        spans.sort()
        assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == items[index][key].shape[0]
    return items


def test_encode_stream_equals_unary(stub):
    sequences = [SEQUENCES[0] * 4, *SEQUENCES[1:]]  # 440 residues: its maps span several 64 KiB chunks
    unary = stub.Encode(encode_request("esm2-tiny", sequences, ALL, [-1, 0]))
    stream_request = pb.EncodeStreamRequest(
        model="esm2-tiny", params=pb.EncodeParams(include=ALL, repr_layers=[-1, 0]),
        items=[pb.SequenceItem(sequence=s) for s in sequences],
        stream_options=pb.StreamOptions(max_chunk_bytes=64 << 10),  # the smallest accepted
    )
    messages = list(stub.EncodeStream(stream_request))
    assert max(len(m.chunk.data) for m in messages) <= 64 << 10
    assert sum(m.chunk.row_start > 0 for m in messages) > 10  # tensors were cut into chunks
    items = reassemble(messages)
    assert sorted(items) == [0, 1, 2]
    for index, result in enumerate(unary.results):
        item = items[index]
        assert item["header"].sequence_length == len(sequences[index])
        assert list(item["header"].vocab_tokens) == list(result.vocab_tokens)
        for e in result.embeddings:
            np.testing.assert_array_equal(item[("mean", e.layer)], np.asarray(e.embedding, np.float32))
        for e in result.bos_embeddings:
            np.testing.assert_array_equal(item[("bos", e.layer)], np.asarray(e.embedding, np.float32))
        for e in result.per_token_embeddings:
            np.testing.assert_array_equal(item[("per_token", e.layer)], matrix(e.embeddings))
        for key in ("contacts", "attentions", "logits"):
            np.testing.assert_array_equal(item[(key, None)], matrix(getattr(result, key)))
        assert len(item) == 1 + 2 * 3 + 3  # header, 3 per-layer outputs x 2 layers, 3 matrices


@pytest.mark.parametrize("data_type,tolerance", [(pb.DATA_TYPE_FLOAT16, 1e-3), (pb.DATA_TYPE_BFLOAT16, 8e-3)])
def test_half_precision_streams(stub, data_type, tolerance):
    unary = stub.Encode(encode_request("esm2-tiny", SEQUENCES[:1], ["per_token"]))
    request = pb.EncodeStreamRequest(
        model="esm2-tiny", params=pb.EncodeParams(include=["per_token"]), items=[pb.SequenceItem(sequence=SEQUENCES[0])],
        stream_options=pb.StreamOptions(data_type=data_type),
    )
    messages = list(stub.EncodeStream(request))
    assert all(m.chunk.data_type == data_type for m in messages if m.HasField("chunk"))
    got = reassemble(messages)[0][("per_token", 2)]
    expected = matrix(unary.results[0].per_token_embeddings[0].embeddings)
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)


def test_predict_stream_equals_unary(stub):
    sequences = ["MK<mask>AY", "<mask>" * 3 + "ACD"]
    items = [pb.SequenceItem(sequence=s) for s in sequences]
    unary = stub.Predict(pb.PredictRequest(model="esm2-tiny", items=items))
    streamed = reassemble(stub.PredictStream(pb.PredictStreamRequest(model="esm2-tiny", items=items)))
    for index, result in enumerate(unary.results):
        assert list(streamed[index]["header"].sequence_tokens) == list(result.sequence_tokens)
        np.testing.assert_array_equal(streamed[index][("logits", None)], matrix(result.logits))


@pytest.mark.slow
def test_650m_width_per_token_of_2048_residues_streams(tmp_path, server_factory):
    """2048 x 1280 float32 (10 MiB) per item: far over gRPC's 4 MiB default, in ~1 MiB chunks."""
    path = write_random_checkpoint("wide", tmp_path / "ckpt", seed=3)
    server = server_factory(models={"esm2-wide": path})
    rng = np.random.default_rng(1)
    sequences = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 2048)) for _ in range(2)]
    # A default-limits channel: every message must fit gRPC's 4 MiB default.
    with grpc.insecure_channel(server.target) as channel:
        messages = list(pb_grpc.Esm2ServiceStub(channel).EncodeStream(pb.EncodeStreamRequest(
            model="esm2-wide", params=pb.EncodeParams(include=["per_token"]),
            items=[pb.SequenceItem(sequence=s) for s in sequences],
        )))
    assert max(m.ByteSize() for m in messages) < 2 << 20
    items = reassemble(messages)
    loaded = load("esm2-wide", path)
    for index, sequence in enumerate(sequences):
        per_token = items[index][("per_token", 1)]
        assert per_token.shape == (2048, 1280)
        assert_close(per_token, reference(loaded, sequence, layers=[1])["per_token"][1])


def test_unknown_data_type_is_invalid(stub):
    request = pb.EncodeStreamRequest(model="esm2-tiny", items=[pb.SequenceItem(sequence="MKT")],
                                     stream_options=pb.StreamOptions(data_type=9))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.EncodeStream(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("stream_options.data_type: unknown value 9; allowed: DATA_TYPE_UNSPECIFIED")
