"""Optional API keys: `authorization: Token <key>` metadata (the HTTP header via Envoy).

Keys are compared in constant time against every configured key and never logged.
Health checks, reflection, schemas and the model list stay open. The check itself runs in
service.api.request_guard, on metadata, before a request message is decoded.
"""

from __future__ import annotations

import hmac

OPEN_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/esm.v1.Esm2Service/GetRequestSchema",
    "/esm.v1.Esm2Service/ListModels",
    "/esm.v1.Esm2Service/GetOpenApiDocument",
    "/esm.v1.Esm2Service/GetDocsPage",
)


def key_matches(header: str | None, keys: list[bytes]) -> bool:
    scheme, _, supplied = (header or "").partition(" ")
    if scheme.lower() not in ("token", "bearer"):
        supplied = ""
    candidate = supplied.strip().encode()
    matched = False
    for key in keys:  # no early exit: time does not depend on which key matched
        matched |= hmac.compare_digest(candidate, key)
    return matched and bool(candidate)


def load_keys(path: str | None, inline: str | None) -> list[str]:
    keys = [k.strip() for k in (inline or "").split(",") if k.strip()]
    if path:
        with open(path, encoding="utf-8") as handle:
            keys += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    return keys
