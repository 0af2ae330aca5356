"""What the server knows about the request it is working on: its id, and what it asked for.

One `RequestContext` per RPC, held in a context variable while the handler runs (so every log
line about the request carries its id: service.logs) and handed to the scheduler with the
request's items (so the batches that run them can report queue wait and trace spans back).

The request id comes from the `x-request-id` metadata: Envoy makes one for every request, and
keeps a caller's valid one (gateway/edge.lua applies the same rule). A gRPC caller that
bypasses Envoy and sends none, or one that is too long or has other characters than these,
gets a fresh one: a caller's value is never echoed unchecked (logs, error bodies, trailers).
"""

from __future__ import annotations

import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
# Letters, digits and . _ : - (UUIDs, ULIDs, W3C trace ids, most tracing systems' ids), starting
# with a letter or digit; the same rule is in gateway/edge.lua.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,%d}" % (MAX_REQUEST_ID_CHARS - 1))


def valid_request_id(value: str | None) -> bool:
    return value is not None and _VALID_REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    return str(uuid.uuid4())


def request_id_from(metadata) -> str:
    """The caller's (or Envoy's) x-request-id when valid, else a new one."""
    value = next((v for k, v in metadata or () if k == REQUEST_ID_HEADER), None)
    if isinstance(value, bytes):
        return new_request_id()
    return value if valid_request_id(value) else new_request_id()


@dataclass(eq=False)
class RequestContext:
    """One RPC: its id, what it asks of which model, and what the engine reported about it."""

    request_id: str
    method: str = ""
    model: str = ""
    items: int = 0
    residues: int = 0
    trace_id: str = ""  # 32 hex digits while tracing, else empty
    span: object | None = None  # the RPC's OpenTelemetry span while tracing (service.tracing)
    submitted_ns: int = 0  # wall clock (time.time_ns) when its items were queued
    first_batch_ns: int = 0  # when the first batch holding one of its items started
    queue_wait_s: float | None = None  # the longest any of its items waited for a batch
    started: float = field(default_factory=time.monotonic)

    def submitted(self) -> None:
        self.submitted_ns = time.time_ns()

    def batch_started(self, waited_s: float, now_ns: int) -> None:
        """One of its items starts running after waiting `waited_s` (called on the event loop)."""
        self.queue_wait_s = waited_s if self.queue_wait_s is None else max(self.queue_wait_s, waited_s)
        if not self.first_batch_ns:
            self.first_batch_ns = now_ns


CURRENT: ContextVar[RequestContext | None] = ContextVar("esm_request", default=None)


def current() -> RequestContext | None:
    return CURRENT.get()
