"""deploy/compose.yaml (and its GPU override), checked offline against the server and the gateway:
the gateway's pool is the server service under the model it serves, both are health-checked and
restarted by the engine, the weights are read-only, the stop grace covers the drain, the GPU
variant reserves a GPU per replica.
"""

from __future__ import annotations

import contextlib
import io
import re

import yaml
from support import REPO

from gateway import envoy_config
from gateway.envoy_config import HEALTH_CHECK_INTERVAL_S, UNHEALTHY_THRESHOLD

DEPLOY = REPO / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def default(value: str) -> str:
    """A compose value with its ${VAR:-default} substitutions replaced by the defaults."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def seconds(value: str) -> float:
    return float(value.rstrip("s"))


def test_the_gateway_pools_the_server_service_under_its_model():
    services = load("compose.yaml")["services"]
    server, gateway = services["server"], services["gateway"]
    model = default(server["environment"]["ESM_MODELS"])
    entrypoint = [default(part) for part in gateway["entrypoint"]]
    assert entrypoint[:2] == ["esm2-gateway", "--no-server"]
    assert entrypoint[entrypoint.index("--pool") + 1] == f"{model}=server:50051"
    assert server["deploy"]["replicas"] and int(default(server["deploy"]["replicas"])) >= 2
    # The entrypoint's gateway flags render: one STRICT_DNS pool, the service name giving every replica.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert envoy_config.main([*entrypoint[2:], "--descriptor", "/etc/esm2/esm2_descriptor.pb"]) == 0
    clusters = {c["name"]: c for c in yaml.safe_load(printed.getvalue())["static_resources"]["clusters"]}
    assert list(clusters) == [f"pool_{model}"] and clusters[f"pool_{model}"]["type"] == "STRICT_DNS"
    address = clusters[f"pool_{model}"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "server", "port_value": 50051}


def test_supervision_health_drain_and_hardening():
    services = load("compose.yaml")["services"]
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert isinstance(service["healthcheck"]["test"], str), name  # a shell command: see compose.yaml
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
    server = services["server"]
    assert server["healthcheck"]["test"].split()[:2] == ["esm2", "health"]
    assert server["volumes"] == ["${ESM_WEIGHTS:-/srv/esm2}:/models:ro"]
    drain = float(server["environment"]["ESM_DRAIN_SECONDS"])
    grace = float(server["environment"]["ESM_GRACE_SECONDS"])
    assert drain > UNHEALTHY_THRESHOLD * HEALTH_CHECK_INTERVAL_S  # Envoy moves traffic off before the stop
    assert seconds(server["stop_grace_period"]) > drain + grace


def test_gpu_variant_reserves_a_gpu_per_replica():
    server = load("compose.gpu.yaml")["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "cuda" in default(server["image"])
