"""OpenTelemetry tracing: Envoy starts the trace, the server continues it down to the forward pass.

A real OTLP receiver runs in this process (the collector's gRPC TraceService from
opentelemetry-proto); a real Envoy and a real server export to it.
"""

from __future__ import annotations

import json
import threading
from concurrent import futures

import grpc
import pytest
import requests
from support import ServerProcess, encode_request, free_port, wait_for

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the otel extra (make setup installs it)")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from esm2_wire.proto import pb_grpc  # noqa: E402
from gateway.envoy_config import GatewayConfig  # noqa: E402
from gateway.launch import EnvoyProcess  # noqa: E402

SERVER_SPANS = ("validate", "queue wait", "batch", "forward", "render")


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span, as {service, name, ids, attributes}."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({
                            "service": service, "name": span.name, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        })
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


def _value(value):
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_checkpoint):
    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    tmp = tmp_path_factory.mktemp("tracing")
    server = ServerProcess(tmp, "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}",
                           "--otlp-endpoint", f"127.0.0.1:{port}", "--log-format", "json", "--access-log",
                           env={"OTEL_BSP_SCHEDULE_DELAY": "100"}).wait_ready()
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=server.port,
                                       otlp_endpoint=f"127.0.0.1:{port}"), log_path=tmp / "envoy.log").wait_listening()
    yield receiver, server, envoy
    envoy.stop()
    server.stop()
    collector.stop(0)


def assert_one_trace_down_to_the_forward_pass(receiver: Receiver, trace_id: str, method: str) -> list[dict]:
    """Envoy's span -> the server's RPC span -> validate, queue wait, batch -> forward, render."""
    def complete():
        names = {s["name"] for s in receiver.trace(trace_id)}
        return set(SERVER_SPANS) <= names and any(s["service"] == "esm2-gateway" for s in receiver.trace(trace_id))

    wait_for(complete, timeout=60)
    spans = receiver.trace(trace_id)
    by_id = {s["span_id"]: s for s in spans}
    rpc = next(s for s in spans if s["name"] == f"/esm.v1.Esm2Service/{method}")
    assert rpc["service"] == "esm2-server"
    assert by_id[rpc["parent"]]["service"] == "esm2-gateway"  # continues Envoy's span
    named = {s["name"]: s for s in spans if s["service"] == "esm2-server"}
    for child in ("validate", "queue wait", "batch", "render"):
        assert named[child]["parent"] == rpc["span_id"], child
    assert named["forward"]["parent"] == named["batch"]["span_id"]
    batch = named["batch"]["attributes"]
    assert batch["esm.model"] == "esm2-tiny" and batch["esm.batch.size"] == 2
    assert batch["esm.batch.tokens"] == 12 + 11 and batch["esm.batch.padded_tokens"] == 2 * 12
    assert batch["esm.batch.padding_efficiency"] == pytest.approx(23 / 24)
    return spans


def test_a_json_call_is_one_trace_from_envoy_to_the_forward_pass(traced):
    receiver, server, envoy = traced
    response = requests.post(envoy.url + "/api/v3/esm2-tiny/encode/", timeout=60,
                             json={"items": [{"sequence": "MKTAYIAKQR"}, {"sequence": "MKTAYIAKQ"}]})
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    wait_for(lambda: request_id in server.log(), timeout=30)
    access = next(json.loads(line) for line in server.log().splitlines() if request_id in line)
    assert len(access["trace_id"]) == 32  # the log line names the trace
    assert_one_trace_down_to_the_forward_pass(receiver, access["trace_id"], "EncodeJson")


def test_a_grpc_call_through_envoy_is_one_trace_too(traced):
    receiver, server, envoy = traced
    with grpc.insecure_channel(envoy.url.removeprefix("http://")) as channel:
        _, call = pb_grpc.Esm2ServiceStub(channel).Encode.with_call(
            encode_request("esm2-tiny", ["MKTAYIAKQW", "MKTAYIAKW"]), metadata=[("x-request-id", "traced-grpc-1")])
    wait_for(lambda: "traced-grpc-1" in server.log(), timeout=30)
    access = next(json.loads(line) for line in server.log().splitlines() if "traced-grpc-1" in line)
    assert_one_trace_down_to_the_forward_pass(receiver, access["trace_id"], "Encode")
    # Envoy's health checks (every second) are not traced: they would bury the requests.
    assert not [s for s in receiver.spans if "grpc.health" in s["name"]]


CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
REFUSED_TRACEPARENTS = {  # W3C Trace Context: each starts a new trace
    "traceparent_version_ff": f"ff-{CALLER_TRACE}-00f067aa0ba902b7-01",
    "traceparent_malformed": f"00-{CALLER_TRACE.upper()}-00F067AA0BA902B7-01",
    "traceparent_too_long": f"01-{CALLER_TRACE}-00f067aa0ba902b7-01-" + "x" * 600,
}


def test_bad_traceparents_start_a_new_trace_counted_not_logged(traced):
    """Issue 32: an invalid or oversized traceparent, sent straight to the server, starts a new
    trace; it adds no log line of its own (callers could write log lines at will), only a count."""
    _, server, _ = traced
    stub = pb_grpc.Esm2ServiceStub(server.channel)
    valid = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"
    stub.Encode(encode_request("esm2-tiny", ["MKTAY"]), metadata=[("traceparent", valid), ("x-request-id", "tp-valid")])
    before = server.metrics()
    for number, (reason, traceparent) in enumerate(REFUSED_TRACEPARENTS.items()):
        for repeat in range(3):
            stub.Encode(encode_request("esm2-tiny", ["MKTAY"]),
                        metadata=[("traceparent", traceparent), ("x-request-id", f"tp-{number}-{repeat}")])
    wait_for(lambda: "tp-2-2" in server.log(), timeout=30)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    traces = {line["request_id"]: line.get("trace_id") for line in lines if str(line.get("request_id", "")).startswith("tp-")}
    assert traces["tp-valid"] == CALLER_TRACE  # a valid traceparent is continued
    assert all(len(traces[f"tp-{n}-{r}"]) == 32 and traces[f"tp-{n}-{r}"] != CALLER_TRACE
               for n in range(3) for r in range(3))
    assert not [line for line in lines if "traceparent" in json.dumps(line).lower()]
    after = server.metrics()
    for reason in REFUSED_TRACEPARENTS:
        key = f'esm_ignored_trace_headers_total{{reason="{reason}"}}'
        assert after.get(key, 0) - before.get(key, 0) == 3, reason
