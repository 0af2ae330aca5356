"""What every RPC passes before its request message is decoded.

grpc's asyncio server runs interceptors on the method name and metadata only; the message
is read and decoded afterwards by the handler's deserializer. So, in this order:
1. metadata over --max-metadata-bytes can never succeed: INVALID_ARGUMENT, body not decoded;
2. a missing or wrong API key: UNAUTHENTICATED, body not decoded (see service.api.auth);
3. a message over --max-request-message-bytes: INVALID_ARGUMENT, without decoding it;
4. a message that is not valid protobuf: INVALID_ARGUMENT (grpc itself would answer UNKNOWN
   and log a traceback per call), logged at most once per LOG_INTERVAL_S.
Handlers are built once per method, not per call.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc

from service import metrics
from service.api.auth import OPEN_METHODS, authorization, key_matches
from service.errors import InvalidRequest, ServiceError, Unauthenticated
from service.api.json_body import failure
from service.request_context import request_id_from

log = logging.getLogger(__name__)

DEFAULT_MAX_METADATA_BYTES = 16 << 10
LOG_INTERVAL_S = 60.0
_HPACK_ENTRY_OVERHEAD = 32  # RFC 7541 4.1: what one header costs in a header table
_DENIED = "missing or invalid API key: send the header 'Authorization: Token <key>'"


def max_request_message_bytes(max_items: int, max_sequence_length: int, max_windowed_residues: int = 0) -> int:
    """The largest valid request message: every item at the longest predict text (all `<mask>`,
    6 letters per residue) or the longest windowed sequence (one letter per residue), plus its
    framing, and 16 KiB for the model name, params and options."""
    return max_items * (max(max_sequence_length * 6, max_windowed_residues) + 16) + (16 << 10)


# A mutation's bytes in a Score request: `A2048G` and its `:` or a string's framing.
SCORE_MUTATION_BYTES = 12


def max_score_message_bytes(max_items: int, max_sequence_length: int, max_mutations: int,
                            max_windowed_residues: int = 0) -> int:
    """The largest valid Score message: the wild types, as any request's items, plus every variant."""
    return (max_request_message_bytes(max_items, max_sequence_length, max_windowed_residues)
            + max_mutations * SCORE_MUTATION_BYTES)


def metadata_bytes(metadata) -> int:
    return sum(len(key) + len(value) + _HPACK_ENTRY_OVERHEAD for key, value in metadata or ())


class _Malformed:
    """What a deserializer hands the handler instead of raising: why it could not decode."""

    __slots__ = ("error",)

    def __init__(self, reason: str):
        self.error = InvalidRequest(reason)


class _RateLimitedLog:
    """One log line per interval, saying how many were suppressed since the last one."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._next = self._suppressed, 0, now + self.interval_s
        log.warning(message + " (%d similar suppressed in the last %.0fs)", *args, suppressed, self.interval_s)


# Methods of the JSON gateway: their refusals also carry the HTTP status and BioLM's error body.
GATEWAY_METHODS = frozenset(
    f"/esm.v1.Esm2Service/{name}" for name in ("EncodeJson", "PredictJson", "LogProbJson", "ScoreJson", "ScoreStreamJson",
                                               "GetRequestSchema",
                                               "GetOpenApiDocument", "GetDocsPage", "GetPlaygroundPage")
)


async def _abort(context, error: ServiceError, gateway: bool) -> None:
    await context.abort(*failure(error, "", gateway, request_id_from(context.invocation_metadata())))


def _abort_with(error: ServiceError, handler, gateway: bool):
    """A handler of the same kind as `handler` that answers `error`; its request stays raw bytes."""

    async def unary(request, context):
        await _abort(context, error, gateway)

    async def stream(request, context):
        await _abort(context, error, gateway)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)


class RequestGuard(grpc.aio.ServerInterceptor):
    def __init__(self, keys: list[str], max_metadata_bytes: int, max_message_bytes: int,
                 message_bytes_by_method: dict[str, int] | None = None):
        """message_bytes_by_method: other limits for some methods (the JSON gateway's, whose
        bodies have their own bound and deserve an answer about the body, not its size)."""
        self._keys = [k.encode() for k in keys]
        self.max_metadata_bytes = max_metadata_bytes
        self.max_message_bytes = max_message_bytes
        self.message_bytes_by_method = message_bytes_by_method or {}
        self._malformed_log = _RateLimitedLog(LOG_INTERVAL_S)
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}
        self._denied: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        method = details.method
        guarded = self._guarded.get(method)
        if guarded is None:
            handler = await continuation(details)
            if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
                return None
            limit = self.message_bytes_by_method.get(method, self.max_message_bytes)
            gateway = method in GATEWAY_METHODS
            guarded = self._guarded[method] = self._guard(handler, limit, gateway)
            self._denied[method] = _abort_with(Unauthenticated(_DENIED), handler, gateway)
        size = metadata_bytes(details.invocation_metadata)
        if size > self.max_metadata_bytes:
            metrics.REFUSED_UNDECODED.labels("metadata").inc()
            return _abort_with(
                InvalidRequest(
                    f"request metadata (headers) is {size} bytes; at most {self.max_metadata_bytes} are accepted"
                ),
                guarded,
                method in GATEWAY_METHODS,
            )
        if self._keys and not method.startswith(OPEN_METHODS):
            if not key_matches(authorization(details.invocation_metadata), self._keys):
                metrics.REFUSED_UNDECODED.labels("api_key").inc()
                return self._denied[method]
        return guarded

    def _guard(self, handler: grpc.RpcMethodHandler, limit: int, gateway: bool) -> grpc.RpcMethodHandler:
        """The same handler, but with its request size checked and its decode failures answered."""
        if handler.request_streaming or handler.request_deserializer is None:
            return handler  # reflection's streams; nothing of ours
        deserialize = handler.request_deserializer

        def decode(data: bytes):
            if len(data) > limit:
                metrics.REFUSED_UNDECODED.labels("size").inc()
                return _Malformed(
                    f"request message is {len(data)} bytes; the largest valid request is {limit} bytes "
                    "(--max-request-message-bytes)"
                )
            try:
                return deserialize(data)
            except Exception as exc:  # protobuf's DecodeError, or anything a decoder may raise
                metrics.REFUSED_UNDECODED.labels("undecodable").inc()
                self._malformed_log.warning("undecodable %d-byte request message: %s", len(data), type(exc).__name__)
                return _Malformed("request message could not be decoded as protobuf")

        behavior = handler.unary_stream or handler.unary_unary
        if inspect.isasyncgenfunction(behavior):
            async def checked(request, context):
                if isinstance(request, _Malformed):
                    await _abort(context, request.error, gateway)
                async for message in behavior(request, context):
                    yield message
        else:
            async def checked(request, context):
                if isinstance(request, _Malformed):
                    await _abort(context, request.error, gateway)
                return await behavior(request, context)

        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
        return make(checked, request_deserializer=decode, response_serializer=handler.response_serializer)
