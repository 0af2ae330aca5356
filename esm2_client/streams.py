"""Reassemble EncodeStream / PredictStream messages into float32 numpy arrays.

Each output is preallocated once from its chunk's `shape`; every chunk's rows are
decoded straight into their slice (np.frombuffer views the message bytes, so the
only copy is the one into the result).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.item_outputs import ItemResult
from service.proto import pb


@dataclass
class ItemOutputs(ItemResult):
    """Outputs of one sequence (see ItemResult), with its length and token names."""

    length: int = 0
    vocab_tokens: list[str] = field(default_factory=list)
    sequence_tokens: list[str] = field(default_factory=list)


_LAYERED = {pb.OUTPUT_KIND_MEAN: "mean", pb.OUTPUT_KIND_BOS: "bos", pb.OUTPUT_KIND_PER_TOKEN: "per_token"}
_SINGLE = {
    pb.OUTPUT_KIND_CONTACTS: "contacts", pb.OUTPUT_KIND_ATTENTIONS: "attentions", pb.OUTPUT_KIND_LOGITS: "logits",
}


class StreamError(ValueError):
    """The server sent a stream that does not describe whole tensors."""


def decode_rows(chunk: pb.TensorChunk, target: np.ndarray) -> None:
    """Write the chunk's rows into `target` (float32, the whole tensor)."""
    rows = target.reshape(target.shape[0] if target.ndim else 1, -1)
    start, count = chunk.row_start, chunk.row_count
    if start < 0 or start + count > rows.shape[0]:
        raise StreamError(f"chunk rows {start}..{start + count} outside a tensor of {rows.shape[0]} rows")
    out = rows[start : start + count]
    if chunk.data_type == pb.DATA_TYPE_BFLOAT16:
        bits = np.frombuffer(chunk.data, dtype="<u2")
        # bfloat16 is the upper half of a float32: widen the bits in place of the result.
        np.left_shift(bits.reshape(out.shape), 16, out=out.view(np.uint32), dtype=np.uint32)
        return
    wire = "<f2" if chunk.data_type == pb.DATA_TYPE_FLOAT16 else "<f4"
    data = np.frombuffer(chunk.data, dtype=wire)
    if data.size != out.size:
        raise StreamError(f"chunk holds {data.size} values, expected {out.size}")
    out[...] = data.reshape(out.shape)


class StreamAssembler:
    """Feed it every message of one stream; `items` then holds one ItemOutputs per item."""

    def __init__(self) -> None:
        self.items: dict[int, ItemOutputs] = {}
        self._rows: dict[tuple, list[int]] = {}  # (item, output, layer) -> [rows received, rows expected]

    def add(self, message) -> None:
        if message.WhichOneof("payload") == "item_header":
            header = message.item_header
            self.items[header.sequence_index] = ItemOutputs(
                length=header.sequence_length,
                vocab_tokens=list(header.vocab_tokens),
                sequence_tokens=list(header.sequence_tokens),
            )
            return
        chunk = message.chunk
        item = self.items.get(chunk.sequence_index)
        if item is None:
            raise StreamError(f"chunk for item {chunk.sequence_index} arrived before its header")
        shape = tuple(chunk.shape)
        if chunk.output in _LAYERED:
            per_layer = getattr(item, _LAYERED[chunk.output])
            target = per_layer.get(chunk.layer)
            if target is None:
                target = per_layer[chunk.layer] = np.empty(shape, dtype=np.float32)
        elif chunk.output in _SINGLE:
            name = _SINGLE[chunk.output]
            target = getattr(item, name)
            if target is None:
                target = np.empty(shape, dtype=np.float32)
                setattr(item, name, target)
        else:
            raise StreamError(f"unknown output kind {chunk.output}")
        if target.shape != shape:
            raise StreamError(f"chunk shape {shape} differs from earlier chunks' {target.shape}")
        decode_rows(chunk, target)
        received = self._rows.setdefault((chunk.sequence_index, chunk.output, chunk.layer), [0, target.shape[0]])
        received[0] += chunk.row_count

    def ordered(self, count: int) -> list[ItemOutputs]:
        missing = [i for i in range(count) if i not in self.items]
        if missing:
            raise StreamError(f"stream ended without items {missing}")
        short = [key for key, (got, expected) in self._rows.items() if got < expected]
        if short:
            raise StreamError(f"stream ended before all rows of {len(short)} tensors arrived")
        return [self.items[i] for i in range(count)]
