"""The streaming RPCs' tensor chunks: numpy arrays to packed little-endian rows and back.

`tensor_chunks` (server) and `decode_rows` (client) are the two halves of one format:
float32, float16 or bfloat16 rows, each chunk a whole number of rows under a byte budget.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from esm2_wire.proto import pb

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 3 << 20
# Smaller chunks only cost messages: at 1 byte a request's outputs become ~200,000 messages and
# seconds of server CPU, while 64 KiB keeps per-message overhead under 1% of the bytes.
MIN_CHUNK_BYTES = 64 << 10


class ChunkError(ValueError):
    """Chunks that do not describe whole tensors."""


def chunk_size(requested: int) -> int:
    """The chunk byte budget for a request's max_chunk_bytes (0: the default; capped). The server
    refuses a value under MIN_CHUNK_BYTES before it calls this."""
    if requested <= 0:
        return DEFAULT_CHUNK_BYTES
    return min(requested, MAX_CHUNK_BYTES)


def to_wire(array: np.ndarray, data_type: int) -> np.ndarray:
    """Little-endian array of the requested element type."""
    array = np.ascontiguousarray(array, dtype="<f4")
    if data_type == pb.DATA_TYPE_FLOAT16:
        return array.astype("<f2")
    if data_type == pb.DATA_TYPE_BFLOAT16:
        bits = array.view("<u4")
        # Round to nearest even, as torch does; NaN stays NaN.
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        return np.where(np.isnan(array), (bits >> 16).astype("<u2") | 0x40, rounded)
    return array


def tensor_chunks(
    index: int, output: int, array: np.ndarray, data_type: int, max_chunk_bytes: int, layer: int | None = None
) -> Iterator[pb.TensorChunk]:
    """`array` as chunks of whole rows, each at most max_chunk_bytes (at least one row)."""
    data_type = data_type or pb.DATA_TYPE_FLOAT32  # UNSPECIFIED means float32
    wire = to_wire(array, data_type)
    rows = wire.shape[0]
    row_bytes = max(1, wire[:1].nbytes)
    per_chunk = max(1, max_chunk_bytes // row_bytes)
    for start in range(0, max(rows, 1), per_chunk):
        part = wire[start : start + per_chunk]
        yield pb.TensorChunk(
            sequence_index=index, output=output, layer=layer, shape=wire.shape, row_start=start,
            row_count=part.shape[0], data_type=data_type, data=part.tobytes(),
        )


def decode_rows(chunk: pb.TensorChunk, target: np.ndarray) -> None:
    """Write the chunk's rows into `target` (float32, the whole tensor)."""
    rows = target.reshape(target.shape[0] if target.ndim else 1, -1)
    start, count = chunk.row_start, chunk.row_count
    if start < 0 or start + count > rows.shape[0]:
        raise ChunkError(f"chunk rows {start}..{start + count} outside a tensor of {rows.shape[0]} rows")
    out = rows[start : start + count]
    if chunk.data_type == pb.DATA_TYPE_BFLOAT16:
        bits = np.frombuffer(chunk.data, dtype="<u2")
        if bits.size != out.size:
            raise ChunkError(f"chunk holds {bits.size} values, expected {out.size}")
        # bfloat16 is the upper half of a float32: widen the bits in place of the result.
        np.left_shift(bits.reshape(out.shape), 16, out=out.view(np.uint32), dtype=np.uint32)
        return
    wire = "<f2" if chunk.data_type == pb.DATA_TYPE_FLOAT16 else "<f4"
    data = np.frombuffer(chunk.data, dtype=wire)
    if data.size != out.size:
        raise ChunkError(f"chunk holds {data.size} values, expected {out.size}")
    out[...] = data.reshape(out.shape)
