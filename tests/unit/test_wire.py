"""The streaming format both sides share: chunks encode and decode exactly, and a stream
reassembles into the results the server rendered (server rendering -> client assembler)."""

from __future__ import annotations

import numpy as np
import pytest

from esm2_client.streams import StreamAssembler
from esm2_wire.chunks import ChunkError, chunk_size, decode_rows, tensor_chunks, to_wire
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb
from service.api import rendering

DATA_TYPES = [pb.DATA_TYPE_UNSPECIFIED, pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16]


def _values(shape, seed=0) -> np.ndarray:
    array = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    array.flat[:4] = [np.nan, np.inf, -0.0, 1e-40]  # the awkward ones
    return array


def _expected(array: np.ndarray, data_type: int) -> np.ndarray:
    """What a reader must get back: float32 exactly, or the narrowed values widened exactly."""
    wire = to_wire(array, data_type)
    if data_type == pb.DATA_TYPE_BFLOAT16:
        return (wire.astype(np.uint32) << 16).view(np.float32)
    return wire.astype(np.float32)


@pytest.mark.parametrize("data_type", DATA_TYPES)
@pytest.mark.parametrize("shape", [(7, 5), (33,), (1, 1)])
def test_chunks_round_trip_in_rows_under_the_byte_budget(shape, data_type):
    array = _values(shape)
    budget = 3 * max(1, to_wire(array[:1], data_type).nbytes)  # three rows a chunk
    chunks = list(tensor_chunks(2, pb.OUTPUT_KIND_PER_TOKEN, array, data_type, budget, layer=6))
    target = np.empty(shape, np.float32)
    for chunk in chunks:
        assert (chunk.sequence_index, chunk.output, chunk.layer, tuple(chunk.shape)) == (2, 3, 6, shape)
        assert len(chunk.data) <= budget
        decode_rows(chunk, target)
    assert [c.row_start for c in chunks] == list(range(0, max(shape[0], 1), 3))
    np.testing.assert_array_equal(target, _expected(array, data_type))
    if data_type in (pb.DATA_TYPE_UNSPECIFIED, pb.DATA_TYPE_FLOAT32):
        np.testing.assert_array_equal(target, array)


def test_bfloat16_rounds_to_nearest_even_like_torch():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x7FC00001], dtype=np.uint32)
    assert to_wire(bits.view(np.float32), pb.DATA_TYPE_BFLOAT16).tolist() == [0x3F80, 0x3F82, 0x3F80, 0x7FC0]


def test_decoding_refuses_chunks_that_do_not_fit_the_tensor():
    (chunk,) = tensor_chunks(0, pb.OUTPUT_KIND_LOGITS, _values((4, 3)), pb.DATA_TYPE_FLOAT32, 1 << 20)
    with pytest.raises(ChunkError, match="outside a tensor of 2 rows"):
        decode_rows(chunk, np.empty((2, 3), np.float32))
    chunk.data = chunk.data[:-4]
    with pytest.raises(ChunkError, match="chunk holds 11 values, expected 12"):
        decode_rows(chunk, np.empty((4, 3), np.float32))


def test_chunk_size_defaults_and_caps():
    assert chunk_size(0) == 1 << 20 and chunk_size(-5) == 1 << 20
    assert chunk_size(1000) == 1000 and chunk_size(1 << 30) == 3 << 20


def _result(length=9, dim=4, layers=(0, 2), seed=1) -> ItemResult:
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return ItemResult(
        mean={layer: draw(dim) for layer in layers}, bos={layer: draw(dim) for layer in layers},
        per_token={layer: draw(length, dim) for layer in layers},
        contacts=draw(length, length), attentions=draw(length, length), logits=draw(length, 20),
    )


def _stream(results, data_type=pb.DATA_TYPE_FLOAT32, chunk_bytes=64):
    for index, result in enumerate(results):
        yield pb.EncodeStreamResponse(item_header=pb.ItemHeader(sequence_index=index, sequence_length=9))
        for chunk in rendering.encode_stream_chunks(index, result, data_type, chunk_bytes):
            yield pb.EncodeStreamResponse(chunk=chunk)


def test_a_rendered_stream_reassembles_into_the_same_results():
    results = [_result(seed=1), ItemResult(mean={6: np.arange(4, dtype=np.float32)}), _result(seed=2)]
    assembler = StreamAssembler()
    for message in _stream(results):
        assembler.add(message)
    for sent, got in zip(results, assembler.ordered(3)):
        for kind in OutputKind:
            want, have = sent.get(kind), got.get(kind)
            if kind.per_layer:
                assert list(have) == list(want)  # same layers, in request order
                for layer in want:
                    np.testing.assert_array_equal(have[layer], want[layer])
            elif want is None:
                assert have is None
            else:
                np.testing.assert_array_equal(have, want)


def test_streams_keep_their_output_order():
    kinds = [OutputKind.from_proto(c.output) for c in rendering.encode_stream_chunks(0, _result(), 0, 1 << 20)]
    assert list(dict.fromkeys(kinds)) == list(rendering.STREAM_ORDER)


def test_the_assembler_refuses_incomplete_or_unknown_streams():
    messages = list(_stream([_result()]))
    assembler = StreamAssembler()
    for message in messages[:-1]:  # the last chunk never came
        assembler.add(message)
    with pytest.raises(ChunkError, match="before all rows of 1 tensors arrived"):
        assembler.ordered(1)
    with pytest.raises(ChunkError, match=r"without items \[1\]"):
        assembler.ordered(2)
    with pytest.raises(ChunkError, match="arrived before its header"):
        StreamAssembler().add(messages[1])
    unknown = pb.EncodeStreamResponse()
    unknown.CopyFrom(messages[1])
    unknown.chunk.output = 99
    with pytest.raises(ChunkError, match="unknown output kind 99"):
        assembler.add(unknown)


def test_output_kinds_match_the_proto_enum_one_to_one():
    assert {kind.proto for kind in OutputKind} == set(pb.OutputKind.values()) - {pb.OUTPUT_KIND_UNSPECIFIED}
    for kind in OutputKind:
        assert OutputKind.from_proto(kind.proto) is kind
        assert OutputKind.parse(kind.value) is kind
    assert OutputKind.parse("per_residue") is OutputKind.PER_TOKEN and OutputKind.parse("Mean") is None
    assert [k.value for k in OutputKind if k.needs_maps] == ["contacts", "attentions"]
    assert [k.value for k in OutputKind if k.per_layer] == ["mean", "per_token", "bos"]
