"""Container image and Kubernetes manifests, checked offline: every overlay renders
(`kubectl kustomize`, part of the CI image), every object is valid Kubernetes, the pieces
agree with each other and with the server, the scanners find nothing, and Envoy's
committed ConfigMaps are exactly what the renderer prints.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from support import REPO

from gateway import envoy_config

KUBERNETES_VERSION = "1.31"  # the oldest release the manifests are validated against
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "k8s" / "overlays").glob("*/kustomization.yaml"))
BIN = Path(sys.executable).parent


def render_overlay(overlay: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/k8s; it is part of the CI image"
    out = subprocess.run([kubectl, "kustomize", str(overlay)], check=True, capture_output=True, text=True, timeout=120)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay.name: render_overlay(overlay) for overlay in OVERLAYS}


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_there_is_a_cpu_and_a_gpu_overlay(rendered):
    assert {"cpu", "gpu"} <= set(rendered)
    gpu_servers = [d for d in by_kind(rendered["gpu"], "Deployment").values()
                   if "nvidia.com/gpu" in d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_servers, "the gpu overlay asks for no nvidia.com/gpu"
    for deployment in gpu_servers:  # the GPU settings (docs/gpus.md)
        variables = env(deployment["spec"]["template"]["spec"]["containers"][0])
        assert variables["ESM_PRECISION"] == "bf16" and variables["ESM_DEVICE"] == "cuda"
        assert int(variables["OMP_NUM_THREADS"]) >= 1


def test_the_image_asks_the_container_toolkit_for_compute_and_utility():
    assert "ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility\n" in (DEPLOY / "Dockerfile").read_text()


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_committed_envoy_configmap_is_what_the_renderer_prints(overlay):
    path = DEPLOY / "k8s" / "overlays" / overlay / "envoy-config.yaml"
    committed = path.read_text()
    command = re.match(r"# Rendered by `python -m gateway\.envoy_config (.*?)`", committed)
    assert command, f"{path} does not say how it was rendered"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert envoy_config.main(shlex.split(command.group(1))) == 0
    assert printed.getvalue() == committed, f"{path} is stale: run `make deploy-config`"


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_every_object_is_valid_kubernetes(rendered, overlay):
    for doc in rendered[overlay]:
        if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue  # CRDs without a published schema offline; checked below and in test_observability.py
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_pools_probes_drain_and_scaling_agree(rendered, overlay):
    docs = rendered[overlay]
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    namespace = docs[0]["metadata"].get("namespace") or by_kind(docs, "Namespace").popitem()[0]
    envoy_yaml = yaml.safe_load(by_kind(docs, "ConfigMap")["esm2-envoy"]["data"]["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy_yaml["static_resources"]["clusters"]}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    budgets = by_kind(docs, "PodDisruptionBudget")
    models = [d for d in deployments.values() if d["metadata"]["labels"].get("app.kubernetes.io/name") == "esm2-server"]
    assert models
    for deployment in models:
        name, pod = deployment["metadata"]["name"], deployment["spec"]["template"]["spec"]
        server = pod["containers"][0]
        model = env(server)["ESM_MODELS"]
        # Probes: native gRPC; readiness on the model's own health name.
        assert server["readinessProbe"]["grpc"]["service"] == model
        assert server["startupProbe"]["grpc"]["service"] == ""
        startup = server["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "too short for a 3B load"
        assert server["livenessProbe"]["grpc"]["service"] == "liveness"  # a hung device, not a drain
        # Drain: preStop + drain window + grace fit in terminationGracePeriodSeconds.
        pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
        drain, grace = float(env(server)["ESM_DRAIN_SECONDS"]), float(env(server)["ESM_GRACE_SECONDS"])
        assert drain > envoy_config.UNHEALTHY_THRESHOLD * envoy_config.HEALTH_CHECK_INTERVAL_S
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + grace
        # Security: non-root, read-only root, no escalation; weights read-only.
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert server["securityContext"]["readOnlyRootFilesystem"] is True
        assert server["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"name": "weights", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
        assert server["resources"]["requests"] and server["resources"]["limits"]
        # The pool: a headless Service selecting these pods, and Envoy's cluster resolving it.
        service = services[name]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        cluster = clusters[f"pool_{model}"]
        assert cluster["type"] == "STRICT_DNS"
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        assert address == {"address": f"{name}.{namespace}.svc.cluster.local", "port_value": 50051}
        assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == model
        assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}  # never the dead hosts
        # Disruptions and autoscaling.
        assert budgets[name]["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()
        trigger = scaled[name]["spec"]["triggers"][0]
        assert f'esm_queue_wait_seconds_sum{{model="{model}"}}' in trigger["metadata"]["query"]
    envoy = deployments["esm2-envoy"]["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": "esm2-envoy"}} in envoy["volumes"]


def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(BIN / "hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_finds_nothing(rendered, tmp_path):
    files = []
    for overlay, docs in rendered.items():
        files += ["-f", str(tmp_path / f"{overlay}.yaml")]
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs))
        for doc in docs:  # every skipped check carries its reason
            for key, value in doc["metadata"].get("annotations", {}).items():
                if key.startswith("checkov.io/skip"):
                    assert re.fullmatch(r"CKV2?_\w+=\S.*", value), f"{key}: {value!r} has no reason"
    result = subprocess.run(
        [str(BIN / "checkov"), *files, "-f", str(DEPLOY / "Dockerfile"), "--framework", "kubernetes", "dockerfile",
         "--compact", "--quiet", "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_the_observability_component_is_in_every_overlay(rendered, overlay):
    """The alerts and dashboard as committed, and PodMonitors that find the pods' named ports."""
    docs = rendered[overlay]
    observability = DEPLOY / "observability"
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load((observability / "prometheusrule.yaml").read_text())["spec"]
    dashboard = by_kind(docs, "ConfigMap")["esm2-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["esm2.json"] == (observability / "dashboard.json").read_text()
    pods = [d["spec"]["template"] for d in by_kind(docs, "Deployment").values()]
    scraped = set()
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        for pod in pods:
            if monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items():
                scraped.add(pod["metadata"]["labels"]["app.kubernetes.io/name"])
                ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
                assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    assert scraped == {"esm2-server", "esm2-envoy"}
    envoy = by_kind(docs, "Deployment")["esm2-envoy"]["spec"]["template"]["spec"]["containers"][0]
    stats_port = {p["name"]: p["containerPort"] for p in envoy["ports"]}["stats"]
    envoy_yaml = yaml.safe_load(by_kind(docs, "ConfigMap")["esm2-envoy"]["data"]["envoy.yaml"])
    listeners = {l["name"]: l for l in envoy_yaml["static_resources"]["listeners"]}
    assert listeners["stats"]["address"]["socket_address"]["port_value"] == stats_port
