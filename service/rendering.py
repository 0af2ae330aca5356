"""Turn numpy results into typed messages, stream chunks and BioLM-shaped JSON.

Pure functions of finished results; the servicer runs them off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import orjson

from service.item_outputs import ItemResult
from service.proto import pb

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 3 << 20


def matrix(array: np.ndarray) -> pb.Matrix:
    rows, cols = array.shape
    return pb.Matrix(rows=rows, cols=cols, values=array.ravel().tolist())


def encode_result(index: int, result: ItemResult, vocab: list[str]) -> pb.EncodeResult:
    message = pb.EncodeResult(sequence_index=index)
    for layer, vector in result.mean.items():
        message.embeddings.add(layer=layer, embedding=vector.tolist())
    for layer, vector in result.bos.items():
        message.bos_embeddings.add(layer=layer, embedding=vector.tolist())
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


def json_body(results: list[dict]) -> bytes:
    # orjson writes float32 arrays straight from numpy, shortest round-trip form.
    return orjson.dumps({"results": results}, option=orjson.OPT_SERIALIZE_NUMPY)


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


def encode_stream_chunks(index: int, result: ItemResult, data_type: int, max_chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    for kind, per_layer in (
        (pb.OUTPUT_KIND_MEAN, result.mean),
        (pb.OUTPUT_KIND_BOS, result.bos),
        (pb.OUTPUT_KIND_PER_TOKEN, result.per_token),
    ):
        for layer, array in per_layer.items():
            yield from tensor_chunks(index, kind, array, data_type, max_chunk_bytes, layer)
    for kind, array in (
        (pb.OUTPUT_KIND_CONTACTS, result.contacts),
        (pb.OUTPUT_KIND_ATTENTIONS, result.attentions),
        (pb.OUTPUT_KIND_LOGITS, result.logits),
    ):
        if array is not None:
            yield from tensor_chunks(index, kind, array, data_type, max_chunk_bytes)


def chunk_size(requested: int) -> int:
    if requested <= 0:
        return DEFAULT_CHUNK_BYTES
    return min(requested, MAX_CHUNK_BYTES)
