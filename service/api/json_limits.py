"""How large a JSON (EncodeJson/PredictJson) or unary gRPC (Encode/Predict) response will be,
checked before any model work.

Envoy buffers a whole unary response, so the JSON path has a size limit
(--max-json-response-mb); bigger outputs belong on the streaming RPCs. The estimate
uses orjson's typical width of a float32 in its shortest form ("-0.12345678," is
12 bytes; attention weights, mostly 1e-3..1e-5, take ~13.5). A unary gRPC response is held
whole by the server and the caller alike, so it has its own limit (--max-unary-response-mb),
at protobuf's 4 bytes a float.
"""

from __future__ import annotations

from esm2_wire.output_kinds import OutputKind

DEFAULT_MAX_JSON_RESPONSE_MB = 512
# 8 items of 2,048 residues with per_token for the 8M shape's 7 layers are 147 MB; the 650M
# shape's last layer alone for 8 such items, 84 MB.
DEFAULT_MAX_UNARY_RESPONSE_MB = 256
# JSON responses in flight on one server, by their estimates: two of the largest at once.
DEFAULT_JSON_BUDGET_MB = 2 * DEFAULT_MAX_JSON_RESPONSE_MB
PROTO_BYTES_PER_VALUE = 4
# Largest JSON request body, after gzip decompression: 8 predict items of 2048 tokens
# written as `<mask>` are ~100 KB. Envoy refuses larger bodies as sent (413); the server
# stops inflating gzip bodies at this size (413).
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
BYTES_PER_VALUE = 12
BYTES_PER_ATTENTION = 14
_PER_ITEM_OVERHEAD = 256  # keys, brackets, vocab_tokens


def _values(kind: OutputKind, length: int, layers: int, embed_dim: int, vocab: int) -> int:
    """Floats one item's output of this kind holds."""
    if kind in (OutputKind.MEAN, OutputKind.BOS):
        return layers * embed_dim
    if kind is OutputKind.PER_TOKEN:
        return layers * length * embed_dim
    if kind is OutputKind.LOGITS:
        return length * vocab
    return length * length  # contacts, attentions


def estimate_encode_bytes(
    lengths: list[int], outputs: frozenset[OutputKind], layers: int, embed_dim: int, vocab: int,
    proto: bool = False,
) -> int:
    """JSON bytes, or with `proto` protobuf bytes, of an encode response."""
    total = _PER_ITEM_OVERHEAD * len(lengths)
    for length in lengths:
        for kind in outputs:
            width = BYTES_PER_ATTENTION if kind is OutputKind.ATTENTIONS else BYTES_PER_VALUE
            total += _values(kind, length, layers, embed_dim, vocab) * (PROTO_BYTES_PER_VALUE if proto else width)
    return total


def estimate_predict_bytes(lengths: list[int], vocab: int, proto: bool = False) -> int:
    # logits plus one quoted token per position
    per_value = PROTO_BYTES_PER_VALUE if proto else BYTES_PER_VALUE
    return sum(length * (vocab * per_value + 10) + _PER_ITEM_OVERHEAD for length in lengths)


def too_large(size: int, limit: int, *, estimated: bool, stream_rpc: str, unary: bool = False) -> str:
    about = "would be about" if estimated else "is"
    what, flag = ("a unary call", "--max-unary-response-mb") if unary else ("JSON", "--max-json-response-mb")
    return (
        f"response too large for {what}: the response {about} {size / 2**20:.0f} MiB, over this server's "
        f"{limit / 2**20:.0f} MiB limit ({flag}); ask for fewer items, layers or outputs "
        f"per request, or use the streaming gRPC RPC esm.v1.Esm2Service/{stream_rpc}"
    )
