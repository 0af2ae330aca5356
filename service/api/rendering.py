"""Turn numpy results into typed messages, stream chunks and BioLM-shaped JSON.

Pure functions of finished results; the servicer runs them off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import orjson

from esm2_wire.chunks import tensor_chunks
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb
from service.api.scoring import ItemScores

# The order outputs take in a stream: per-layer kinds first, each layer in request order.
STREAM_ORDER = (
    OutputKind.MEAN, OutputKind.BOS, OutputKind.PER_TOKEN, OutputKind.CONTACTS, OutputKind.ATTENTIONS,
    OutputKind.LOGITS,
)


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


def score_json(items: list[ItemScores]) -> bytes:
    """Score's response as JSON, the ScoreResponse's fields by their proto names."""
    return json_body([{"sequence_index": i, **_score_fields(s)} for i, s in enumerate(items)])


def encode_stream_chunks(index: int, result: ItemResult, data_type: int, max_chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    for kind in STREAM_ORDER:
        value = result.get(kind)
        if kind.per_layer:
            for layer, array in value.items():
                yield from tensor_chunks(index, kind.proto, array, data_type, max_chunk_bytes, layer)
        elif value is not None:
            yield from tensor_chunks(index, kind.proto, value, data_type, max_chunk_bytes)
