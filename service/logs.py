"""The server's log lines: plain text (default) or one JSON object per line (--log-format json).

Every line written while a request is handled carries its request id (and trace id while
tracing): a logging filter reads them from the request's context (service.request_context).
Per-request access lines (--access-log) add model, items, residues, status, queue wait and
latency. Nothing logs request metadata, so API keys never reach a log line.
"""

from __future__ import annotations

import json
import logging
import time

from service import request_context

# Fields an access line carries (`extra=` of the logging call), in this order in JSON.
ACCESS_FIELDS = ("method", "model", "items", "residues", "status", "queue_wait_s", "latency_s")
# Text lines end with the request id when they are about a request (`... [request_id=ID]`).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_suffix)s"


class RequestFields(logging.Filter):
    """Adds `request_id` and `trace_id` of the request being handled ("-" and "" outside one), and
    the text format's `request_suffix`."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = request_context.current()
        if not hasattr(record, "request_id"):
            record.request_id = context.request_id if context else "-"
        if not hasattr(record, "trace_id"):
            record.trace_id = context.trace_id if context else ""
        record.request_suffix = f" [request_id={record.request_id}]" if record.request_id != "-" else ""
        return True


class JsonFormatter(logging.Formatter):
    """One object per line: time (UTC, ISO 8601, ms), level, logger, message, request and trace
    ids, the access fields a line has, and the traceback of a logged exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if getattr(record, "trace_id", ""):
            entry["trace_id"] = record.trace_id
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def setup(log_format: str = "text") -> None:
    """The root logger's one handler (stderr), in `log_format`, with the request fields."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestFields())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


ACCESS_LOG = logging.getLogger("service.access")


def access_line(context: request_context.RequestContext, status: str) -> None:
    """One line per finished RPC (--access-log)."""
    latency = time.monotonic() - context.started
    fields = {"method": context.method, "model": context.model, "items": context.items,
              "residues": context.residues, "status": status,
              "queue_wait_s": None if context.queue_wait_s is None else round(context.queue_wait_s, 6),
              "latency_s": round(latency, 6)}
    wait = "-" if context.queue_wait_s is None else f"{context.queue_wait_s * 1000:.1f}ms"
    ACCESS_LOG.info("%s %s %s items=%d residues=%d queue_wait=%s latency=%.1fms", context.method, context.model or "-",
                    status, context.items, context.residues, wait, latency * 1000, extra=fields)
