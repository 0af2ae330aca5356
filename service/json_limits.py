"""How large a JSON (EncodeJson/PredictJson) response will be, checked before any model work.

Envoy buffers a whole unary response, so the JSON path has a size limit
(--max-json-response-mb); bigger outputs belong on the streaming RPCs. The estimate
uses orjson's typical width of a float32 in its shortest form ("-0.12345678," is
12 bytes; attention weights, mostly 1e-3..1e-5, take ~13.5).
"""

from __future__ import annotations

DEFAULT_MAX_JSON_RESPONSE_MB = 512
# Largest JSON request body, after gzip decompression: 8 predict items of 2048 tokens
# written as `<mask>` are ~100 KB. Envoy refuses larger bodies as sent (413); the server
# stops inflating gzip bodies at this size (413).
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
BYTES_PER_VALUE = 12
BYTES_PER_ATTENTION = 14
_PER_ITEM_OVERHEAD = 256  # keys, brackets, vocab_tokens


def estimate_encode_bytes(lengths: list[int], include: frozenset[str], layers: int, embed_dim: int, vocab: int) -> int:
    values = attention = 0
    for length in lengths:
        values += layers * embed_dim * (("mean" in include) + ("bos" in include))
        values += layers * length * embed_dim * ("per_token" in include)
        values += length * length * ("contacts" in include)
        values += length * vocab * ("logits" in include)
        attention += length * length * ("attentions" in include)
    return values * BYTES_PER_VALUE + attention * BYTES_PER_ATTENTION + _PER_ITEM_OVERHEAD * len(lengths)


def estimate_predict_bytes(lengths: list[int], vocab: int) -> int:
    # logits plus one quoted token per position
    return sum(length * (vocab * BYTES_PER_VALUE + 10) + _PER_ITEM_OVERHEAD for length in lengths)


def too_large(size: int, limit: int, *, estimated: bool, stream_rpc: str) -> str:
    about = "would be about" if estimated else "is"
    return (
        f"response too large for JSON: the response {about} {size / 2**20:.0f} MiB, over this server's "
        f"{limit / 2**20:.0f} MiB limit (--max-json-response-mb); ask for fewer items, layers or outputs "
        f"per request, or use the streaming gRPC RPC esm.v1.Esm2Service/{stream_rpc}"
    )
