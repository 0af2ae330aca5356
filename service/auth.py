"""Optional API keys: `authorization: Token <key>` metadata (the HTTP header via Envoy).

Keys are compared in constant time against every configured key and never logged.
Health checks, reflection, schemas and the model list stay open.
"""

from __future__ import annotations

import hmac

import grpc

from service.json_body import gateway_error_metadata

OPEN_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/esm.v1.Esm2Service/GetRequestSchema",
    "/esm.v1.Esm2Service/ListModels",
    "/esm.v1.Esm2Service/GetOpenApiDocument",
)
_DENIED = "missing or invalid API key: send the header 'Authorization: Token <key>'"


def key_matches(header: str | None, keys: list[bytes]) -> bool:
    scheme, _, supplied = (header or "").partition(" ")
    if scheme.lower() not in ("token", "bearer"):
        supplied = ""
    candidate = supplied.strip().encode()
    matched = False
    for key in keys:  # no early exit: time does not depend on which key matched
        matched |= hmac.compare_digest(candidate, key)
    return matched and bool(candidate)


async def _deny_unary(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED, gateway_error_metadata(401, "UNAUTHENTICATED", _DENIED))


async def _deny_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # pragma: no cover - makes this an async generator


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if key_matches(metadata.get("authorization"), self._keys):
            return handler
        kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_deny_stream, **kwargs)
        return grpc.unary_unary_rpc_method_handler(_deny_unary, **kwargs)


def load_keys(path: str | None, inline: str | None) -> list[str]:
    keys = [k.strip() for k in (inline or "").split(",") if k.strip()]
    if path:
        with open(path, encoding="utf-8") as handle:
            keys += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    return keys
