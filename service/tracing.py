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
"""

from __future__ import annotations

import contextlib
import itertools
import logging

log = logging.getLogger(__name__)

_tracer = None  # an opentelemetry Tracer once setup() ran
_provider = None
_batch_ids = itertools.count(1)


class TracingUnavailable(Exception):
    pass


def enabled() -> bool:
    return _tracer is not None


def setup(endpoint: str, service_name: str = "esm2-server"):
    """Export spans to the OTLP/gRPC collector at `endpoint`; the server interceptor that
    continues callers' traces."""
    global _tracer, _provider
    try:
        from opentelemetry import trace
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
