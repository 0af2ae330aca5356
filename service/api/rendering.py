"""Turn numpy results into typed messages, stream chunks and BioLM-shaped JSON.

Pure functions of finished results; the servicer runs them off the event loop, one result
at a time, so that no piece holds the interpreter's lock for long and a cancelled call stops
between pieces.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import orjson

from esm2_wire.chunks import tensor_chunks
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb
from esm2_wire.provenance import Provenance
from service.api.scoring import ItemScores, ScoredBlock

# The order outputs take in a stream: per-layer kinds first, each layer in request order.
STREAM_ORDER = (
    OutputKind.MEAN, OutputKind.BOS, OutputKind.PER_TOKEN, OutputKind.CONTACTS, OutputKind.ATTENTIONS,
    OutputKind.LOGITS,
)


def _packed_floats(field: int, array: np.ndarray) -> bytes:
    """A packed `repeated float` field as protobuf writes it: key, byte length, little-endian float32s.
    Parsed into a message, it is a copy of the array's bytes, where a Python list of floats took
    ~50 ns per value holding the GIL (seconds for a large response)."""
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_MATRIX_VALUES = pb.Matrix.DESCRIPTOR.fields_by_name["values"].number
_EMBEDDING_VALUES = pb.LayerEmbedding.DESCRIPTOR.fields_by_name["embedding"].number


def matrix(array: np.ndarray) -> pb.Matrix:
    rows, cols = array.shape
    message = pb.Matrix(rows=rows, cols=cols)
    message.MergeFromString(_packed_floats(_MATRIX_VALUES, array))
    return message


def _add_embedding(entries, layer: int, vector: np.ndarray) -> None:
    entries.add(layer=layer).MergeFromString(_packed_floats(_EMBEDDING_VALUES, vector))


def encode_result(index: int, result: ItemResult, vocab: list[str]) -> pb.EncodeResult:
    message = pb.EncodeResult(sequence_index=index)
    for layer, vector in result.mean.items():
        _add_embedding(message.embeddings, layer, vector)
    for layer, vector in result.bos.items():
        _add_embedding(message.bos_embeddings, layer, vector)
    for layer, array in result.per_token.items():
        message.per_token_embeddings.add(layer=layer, embeddings=matrix(array))
    if result.contacts is not None:
        message.contacts.CopyFrom(matrix(result.contacts))
    if result.attentions is not None:
        message.attentions.CopyFrom(matrix(result.attentions))
    if result.logits is not None:
        message.logits.CopyFrom(matrix(result.logits))
        message.vocab_tokens.extend(vocab)
    return message


def predict_result(index: int, result: ItemResult, tokens: tuple[str, ...], vocab: list[str]) -> pb.PredictResult:
    return pb.PredictResult(
        sequence_index=index, logits=matrix(result.logits), sequence_tokens=tokens, vocab_tokens=vocab
    )


def encode_json_result(index: int, result: ItemResult, vocab: list[str]) -> dict:
    """One result in the BioLM encode JSON shape; absent outputs are absent keys."""
    out: dict = {"sequence_index": index}
    if result.mean:
        out["embeddings"] = [{"layer": k, "embedding": v} for k, v in result.mean.items()]
    if result.bos:
        out["bos_embeddings"] = [{"layer": k, "embedding": v} for k, v in result.bos.items()]
    if result.per_token:
        out["per_token_embeddings"] = [{"layer": k, "embeddings": v} for k, v in result.per_token.items()]
    for key in ("contacts", "attentions", "logits"):
        if getattr(result, key) is not None:
            out[key] = getattr(result, key)
    if result.logits is not None:
        out["vocab_tokens"] = vocab
    return out


def predict_json_result(index: int, result: ItemResult, tokens: tuple[str, ...], vocab: list[str]) -> dict:
    return {"sequence_index": index, "logits": result.logits, "sequence_tokens": tokens, "vocab_tokens": vocab}


def json_piece(result: dict | None, first: bool, last: bool) -> bytes:
    """One result of the body `{"results":[...]}`, with the body's opening before the first and
    its closing after the last (None: no result)."""
    # orjson writes float32 arrays straight from numpy, shortest round-trip form.
    body = b"" if result is None else orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
    return (b'{"results":[' if first else b",") + body + (b"]}" if last else b"")


def json_body(results: list[dict]) -> bytes:
    """The whole body (what the pieces of json_piece add up to)."""
    last = len(results) - 1
    if not results:
        return json_piece(None, True, True)
    return b"".join(json_piece(r, first=i == 0, last=i == last) for i, r in enumerate(results))


class JsonMessages:
    """A JSON body cut into messages of exactly `size` bytes as its pieces arrive, the rest last.

    `add` returns the messages each piece completes; `rest()` is the last, shorter one. A body
    under `size` bytes, nearly every one, therefore leaves as one message once it is complete.
    Holds under `size` bytes of its own: a large piece is sliced, not copied whole."""

    def __init__(self, size: int):
        self.size = size
        self._pending = b""

    def add(self, piece: bytes) -> list[bytes]:
        view, messages = memoryview(piece), []
        if self._pending:
            need = self.size - len(self._pending)
            if len(view) < need:
                self._pending += piece
                return messages
            messages.append(self._pending + view[:need])
            self._pending, view = b"", view[need:]
        while len(view) >= self.size:
            messages.append(bytes(view[:self.size]))
            view = view[self.size:]
        self._pending = bytes(view)
        return messages

    def rest(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


def log_prob_json(values: list[float]) -> bytes:
    """BioLM's log_prob response: `{"results": [{"log_prob": ...}, ...]}`, in request order."""
    return orjson.dumps({"results": [{"log_prob": value} for value in values]})


def _score_fields(scores: ItemScores) -> dict:
    out: dict = {"scores": scores.scores}
    if scores.pseudo_log_likelihood is not None:
        out.update(pseudo_log_likelihood=scores.pseudo_log_likelihood, scored_positions=scores.scored_positions,
                   variant_pseudo_log_likelihoods=scores.variant_pseudo_log_likelihoods)
    return out


def score_result(index: int, scores: ItemScores) -> pb.ScoreResult:
    return pb.ScoreResult(sequence_index=index, **_score_fields(scores))


def score_json(items: list[ItemScores], provenance: Provenance) -> bytes:
    """Score's response as JSON, the ScoreResponse's fields by their proto names, and, since score is
    our extension rather than a BioLM action, its provenance in the body too (BioLM's actions carry
    it only in headers: their bodies keep BioLM's shape)."""
    results = [{"sequence_index": i, **_score_fields(s)} for i, s in enumerate(items)]
    return orjson.dumps({"results": results, "provenance": provenance.as_dict()}, option=orjson.OPT_SERIALIZE_NUMPY)


def score_block_fields(block: ScoredBlock | None, passes_done: int, passes_total: int) -> dict:
    """One ScoreStreamResponse's fields by their proto names (`block` None: progress only)."""
    out: dict = {"passes_done": passes_done, "passes_total": passes_total}
    if block is not None:
        out.update(sequence_index=block.sequence_index, variant_indexes=block.variant_indexes, scores=block.scores)
        if block.variant_pseudo_log_likelihoods:
            out["variant_pseudo_log_likelihoods"] = block.variant_pseudo_log_likelihoods
        if block.pseudo_log_likelihood is not None:
            out.update(pseudo_log_likelihood=block.pseudo_log_likelihood, scored_positions=block.scored_positions)
    return out


def score_stream_json_line(fields: dict) -> bytes:
    """One line of ScoreStreamJson's newline-delimited JSON."""
    return orjson.dumps(fields) + b"\n"


def encode_stream_chunks(index: int, result: ItemResult, data_type: int, max_chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    for kind in STREAM_ORDER:
        value = result.get(kind)
        if kind.per_layer:
            for layer, array in value.items():
                yield from tensor_chunks(index, kind.proto, array, data_type, max_chunk_bytes, layer)
        elif value is not None:
            yield from tensor_chunks(index, kind.proto, value, data_type, max_chunk_bytes)
