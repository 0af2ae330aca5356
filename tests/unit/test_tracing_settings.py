"""--otlp-endpoint: off by default, and one setting turns on Envoy's tracer and the servers'."""

from __future__ import annotations

import yaml

from gateway.envoy_config import COLLECTOR_CLUSTER, GatewayConfig, render
from gateway.launch import server_commands


def _listener_and_clusters(config: GatewayConfig):
    document = yaml.safe_load(render(config, check_descriptor=False))
    hcm = document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm, {c["name"]: c for c in document["static_resources"]["clusters"]}


def test_tracing_is_off_by_default():
    hcm, clusters = _listener_and_clusters(GatewayConfig())
    assert "tracing" not in hcm and COLLECTOR_CLUSTER not in clusters
    assert hcm["always_set_request_id_in_response"] is True  # request ids are always on


def test_one_setting_turns_on_envoys_tracer_and_the_launched_servers():
    hcm, clusters = _listener_and_clusters(GatewayConfig(otlp_endpoint="http://collector.example:4317"))
    provider = hcm["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == COLLECTOR_CLUSTER
    address = clusters[COLLECTOR_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "collector.example", "port_value": 4317}
    assert clusters[COLLECTOR_CLUSTER]["type"] == "STRICT_DNS"
    (_, _, argv, _), = server_commands(["--models", "esm2-8m"], 1, 512, 4 << 20, "collector.example:4317")
    assert argv[argv.index("--otlp-endpoint") + 1] == "collector.example:4317"
    (_, _, argv, _), = server_commands(["--models", "esm2-8m"], 1, 512, 4 << 20)
    assert "--otlp-endpoint" not in argv
