"""OpenTelemetry tracing of the server, off unless --otlp-endpoint names a collector.

Envoy starts each trace (its OpenTelemetry tracer, gateway/envoy_config.py) and sends the W3C
`traceparent` upstream; the gRPC instrumentation's server interceptor continues it, so the
RPC's span is a child of Envoy's (a gRPC caller that bypasses Envoy starts a trace there). Inside
it: `validate`, `queue wait`, `batch` (model, size, tokens, padding efficiency) with `forward`
under it, and `render`.

A batch serves many requests at once and runs on a worker thread. Each request's trace gets
its own `batch` and `forward` spans, parented to that request's span and recorded with the
batch's real start and end times (the same `esm.batch.id` on every copy). Span links would keep
one batch span, but in a trace of its own: someone following a slow request would see it end
at the RPC and have to chase a link most viewers show as a bare id. Parenting per request keeps
the whole path of a request in one trace, at a cost bounded by the batch size.

opentelemetry is the `otel` extra: without it installed, and while tracing is off, every
function here is a cheap no-op and nothing of OpenTelemetry is imported.

Callers' trace headers are read strictly (`trace_header_problem`, W3C Trace Context): a
`traceparent` over 512 characters, not in lower-case hex, of version `ff` or with all-zero ids
starts a new trace, and a `tracestate` over 512 characters is dropped; each is counted in
`esm_ignored_trace_headers_total{reason}`, never logged, so a caller cannot write log lines at
will (OpenTelemetry's own propagator logs a WARNING per oversized header).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re

from service import metrics

log = logging.getLogger(__name__)

_tracer = None  # an opentelemetry Tracer once setup() ran
_provider = None
_batch_ids = itertools.count(1)


class TracingUnavailable(Exception):
    pass


def enabled() -> bool:
    return _tracer is not None


MAX_TRACE_HEADER_CHARS = 512  # W3C Trace Context's bound, for traceparent and tracestate alike
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.ASCII | re.DOTALL)


def trace_header_problem(traceparent: str) -> str | None:
    """Why a caller's traceparent must start a new trace (a metric label), or None to continue it.
    W3C: version ff is invalid, hex is lower case, ids are not all zero, and version 00 has
    exactly four fields (later versions may append fields)."""
    if len(traceparent) > MAX_TRACE_HEADER_CHARS:
        return "traceparent_too_long"
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None or (match.group(1) == "00" and match.group(5)):
        return "traceparent_malformed"
    if match.group(1) == "ff":
        return "traceparent_version_ff"
    if match.group(2) == "0" * 32 or match.group(3) == "0" * 16:
        return "traceparent_zero_id"
    return None


def _strict_propagator():
    """The W3C propagator behind a strict check that counts what it refuses instead of logging."""
    from opentelemetry.context import Context
    from opentelemetry.propagators import textmap
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    class WithoutTracestate(textmap.Getter):
        def __init__(self, getter):
            self.getter = getter

        def get(self, carrier, key):
            return None if key == "tracestate" else self.getter.get(carrier, key)

        def keys(self, carrier):
            return self.getter.keys(carrier)

    class StrictTraceContext(TraceContextTextMapPropagator):
        def extract(self, carrier, context=None, getter=textmap.default_getter):
            context = Context() if context is None else context
            traceparent = getter.get(carrier, "traceparent")
            if not traceparent:
                return context
            problem = trace_header_problem(traceparent[0])
            if problem is not None:
                metrics.IGNORED_TRACE_HEADERS.labels(problem).inc()
                return context  # a new trace starts here
            tracestate = getter.get(carrier, "tracestate")
            if tracestate and sum(map(len, tracestate)) + len(tracestate) - 1 > MAX_TRACE_HEADER_CHARS:
                metrics.IGNORED_TRACE_HEADERS.labels("tracestate_too_long").inc()
                getter = WithoutTracestate(getter)
            return super().extract(carrier, context, getter)

    return StrictTraceContext()


def setup(endpoint: str, service_name: str = "esm2-server"):
    """Export spans to the OTLP/gRPC collector at `endpoint`; the server interceptor that
    continues callers' traces."""
    global _tracer, _provider
    try:
        from opentelemetry import propagate
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            f"--otlp-endpoint needs OpenTelemetry: pip install 'esm2-service[otel]' ({exc})") from None
    _provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if "://" not in endpoint:  # host:port, as Envoy's setting takes it
        endpoint = "http://" + endpoint
    insecure = not endpoint.startswith("https://")
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
    _tracer = _provider.get_tracer("esm2-service")
    # W3C trace context only: the default also reads `baggage`, which the server has no use for
    # and whose propagator logs a WARNING per oversized header.
    propagate.set_global_textmap(_strict_propagator())
    log.info("tracing: OTLP spans to %s", endpoint)
    # Envoy health-checks every replica every second: those calls would bury the traces of requests.
    return aio_server_interceptor(tracer_provider=_provider, filter_=filters.negate(filters.health_check()))


def shutdown() -> None:
    """Send what is buffered (at exit)."""
    if _provider is not None:
        _provider.shutdown()


def current_span():
    """(span, trace id as 32 hex digits) of the running RPC; (None, "") while tracing is off."""
    if _tracer is None:
        return None, ""
    from opentelemetry import trace

    span = trace.get_current_span()
    context = span.get_span_context()
    return (span, format(context.trace_id, "032x")) if context.is_valid else (None, "")


@contextlib.contextmanager
def span(name: str, **attributes):
    """A child span of the current one (no-op while tracing is off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def record(name: str, parent, start_ns: int, end_ns: int, **attributes):
    """A span that already happened, as a child of `parent` (a span); returns it, ended."""
    if _tracer is None or parent is None:
        return None
    from opentelemetry import trace

    done = _tracer.start_span(name, context=trace.set_span_in_context(parent), start_time=start_ns,
                              attributes=attributes)
    done.end(end_time=end_ns)
    return done


def next_batch_id() -> int:
    return next(_batch_ids)
