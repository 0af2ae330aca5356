"""Reassemble EncodeStream / PredictStream messages into float32 numpy arrays.

Each output is preallocated once from its chunk's `shape`; every chunk's rows are
decoded straight into their slice (np.frombuffer views the message bytes, so the
only copy is the one into the result).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from esm2_wire.chunks import ChunkError, decode_rows
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind

@dataclass(repr=False)  # ItemResult's: shapes and dtypes, not values
class ItemOutputs(ItemResult):
    """Outputs of one sequence (see ItemResult), with its length and token names."""

    length: int = 0
    vocab_tokens: list[str] = field(default_factory=list)
    sequence_tokens: list[str] = field(default_factory=list)


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
            raise ChunkError(f"chunk for item {chunk.sequence_index} arrived before its header")
        shape = tuple(chunk.shape)
        try:
            kind = OutputKind.from_proto(chunk.output)
        except ValueError as exc:
            raise ChunkError(str(exc)) from None
        target = item.get(kind).get(chunk.layer) if kind.per_layer else item.get(kind)
        if target is None:
            target = np.empty(shape, dtype=np.float32)
            item.put(kind, target, chunk.layer)
        if target.shape != shape:
            raise ChunkError(f"chunk shape {shape} differs from earlier chunks' {target.shape}")
        decode_rows(chunk, target)
        received = self._rows.setdefault((chunk.sequence_index, chunk.output, chunk.layer), [0, target.shape[0]])
        received[0] += chunk.row_count

    def ordered(self, count: int) -> list[ItemOutputs]:
        missing = [i for i in range(count) if i not in self.items]
        if missing:
            raise ChunkError(f"stream ended without items {missing}")
        short = [key for key, (got, expected) in self._rows.items() if got < expected]
        if short:
            raise ChunkError(f"stream ended before all rows of {len(short)} tensors arrived")
        return [self.items[i] for i in range(count)]
