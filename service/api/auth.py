"""Optional API keys: `authorization: Token <key>` metadata (the HTTP header via Envoy).

Keys are compared in constant time against every configured key and never logged.
Health checks, reflection, schemas and the model list stay open. The check itself runs in
service.api.request_guard, on metadata, before a request message is decoded; the handlers
then name the call's tenant (Tenancy) in every ModelInput they submit.
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
    "/esm.v1.Esm2Service/GetPlaygroundPage",
)


def authorization(metadata) -> str | None:
    """The call's `authorization` metadata value, if any."""
    return next((value for key, value in metadata or () if key == "authorization"), None)


def matching_key(header: str | None, keys: list[bytes]) -> int | None:
    """The position of the configured key the header carries, or None."""
    scheme, _, supplied = (header or "").partition(" ")
    if scheme.lower() not in ("token", "bearer"):
        supplied = ""
    candidate = supplied.strip().encode()
    found = None
    for position, key in enumerate(keys):  # no early exit: time does not depend on which key matched
        if hmac.compare_digest(candidate, key) and found is None:
            found = position
    return found if candidate else None


def key_matches(header: str | None, keys: list[bytes]) -> bool:
    return matching_key(header, keys) is not None


class Tenancy:
    """Whose results an authenticated call may share: with API keys, each key is a tenant of
    its own (the result cache and the merging of identical items are per tenant), unless
    `shared` (--share-cache-across-keys) puts every key in one. Without keys: one tenant.

    A tenant is named by its key's position in the configuration, `key-<n>`: stable while the
    server runs, and nothing of the key itself."""

    def __init__(self, keys: list[str], shared: bool = False):
        self._keys = [] if shared else [k.encode() for k in keys]

    def of(self, metadata) -> str:
        """The tenant of a call's metadata (its key was already checked by the request guard)."""
        if not self._keys:
            return ""
        position = matching_key(authorization(metadata), self._keys)
        return "" if position is None else f"key-{position}"


def load_keys(path: str | None, inline: str | None) -> list[str]:
    keys = [k.strip() for k in (inline or "").split(",") if k.strip()]
    if path:
        with open(path, encoding="utf-8") as handle:
            keys += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    return keys
