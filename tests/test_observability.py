"""deploy/observability against the real thing: promtool checks the alert rules and runs their unit
tests, and a real Prometheus scrapes a running server and Envoy, evaluates every alert rule and
answers every dashboard query with data, so no panel or alert names a metric that does not exist.

promtool and prometheus come from Debian's `prometheus` package (.ci/run installs it).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import requests
import yaml
from support import REPO, encode_request, free_port, wait_for

from gateway.envoy_config import GatewayConfig, Pool
from gateway.launch import EnvoyProcess
from gateway.processes import stop_process

OBSERVABILITY = REPO / "deploy" / "observability"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is missing: apt-get install prometheus (.ci/run installs it)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is missing: apt-get install prometheus (.ci/run installs it)")

# Series that only kube-state-metrics exports (a process that has exited cannot report its own
# exit status), so the live Prometheus here has none; promtool's unit tests cover them.
KUBE_STATE_METRICS = {"kube_pod_container_status_last_terminated_exitcode", "kube_pod_container_status_restarts_total"}
# Selectors of failures only: a healthy server has no such series yet (a labelled counter appears
# with its first increment), so the live test checks that the metric and the labels they match on exist.
FAILURES_ONLY = {'esm_requests_total{code=~"INTERNAL|UNKNOWN|DATA_LOSS|UNAVAILABLE|DEADLINE_EXCEEDED|UNIMPLEMENTED"}'}


def rule_groups() -> dict:
    return yaml.safe_load((OBSERVABILITY / "prometheusrule.yaml").read_text())["spec"]


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for group in rule_groups()["groups"] for rule in group["rules"] if "alert" in rule}


def dashboard_queries() -> dict[str, str]:
    """'panel title / refId' -> PromQL, with Grafana's variables as Prometheus would get them."""
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace('"$model"', '".*"')
            assert "$" not in expr, f"{panel['title']}: a Grafana variable this test does not know: {expr}"
            queries[f"{panel['title']} / {target['refId']}"] = expr
    return queries


def selectors(expr: str) -> set[str]:
    """The vector selectors in a PromQL expression: metric name plus its label matchers."""
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range durations
    found = set()
    for match in re.finditer(r"(?<![\w.\"])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?", expr):
        name, matchers, call = match.groups()
        if call or name in ("and", "or", "unless", "bool", "offset"):
            continue
        found.add(name + (matchers or ""))
    return found


def run(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


def write_rules(directory: Path) -> Path:
    path = directory / "alerts.rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    return path


# ---- offline: promtool -----------------------------------------------------------------------

@needs_promtool
def test_alert_rules_pass_promtool_check(tmp_path):
    result = run(PROMTOOL, "check", "rules", str(write_rules(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


@needs_promtool
def test_alert_unit_tests_pass_and_fail_when_a_threshold_moves(tmp_path):
    write_rules(tmp_path)
    shutil.copy(OBSERVABILITY / "alerts.test.yaml", tmp_path)
    result = run(PROMTOOL, "test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The unit tests see the rules: the queue wait alert with another threshold fails them.
    groups = rule_groups()
    rule = next(r for r in groups["groups"][0]["rules"] if r.get("alert") == "ESM2QueueWaitAboveScalingTarget")
    rule["expr"] = rule["expr"].replace("> 0.5", "> 2")
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(groups))
    result = run(PROMTOOL, "test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "ESM2QueueWaitAboveScalingTarget" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    tests = yaml.safe_load((OBSERVABILITY / "alerts.test.yaml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"] if not case.get("exp_alerts")}
    assert fired == set(alerts()), "alerts without a firing unit test, or tests of no alert"
    assert quiet <= fired
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_queue_wait_alert_uses_the_autoscaling_target():
    """The alert fires where KEDA's target is (deploy/k8s/model/scaledobject.yaml), on the same measure."""
    scaled = yaml.safe_load((REPO / "deploy" / "k8s" / "model" / "scaledobject.yaml").read_text())
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    expr = alerts()["ESM2QueueWaitAboveScalingTarget"]["expr"]
    threshold = re.search(r">\s*([\d.]+)\s*$", expr.strip()).group(1)
    assert float(threshold) == float(trigger["threshold"])
    assert "rate(esm_queue_wait_seconds_sum[1m])" in expr and "rate(esm_queue_wait_seconds_count[1m])" in expr
    assert "[1m]" in trigger["query"]
    overlays = (REPO / "deploy" / "k8s" / "overlays").glob("*/*/kustomization.yaml")
    for overlay in overlays:  # no model's kustomization moves its threshold away from the alert's
        assert "/spec/triggers/0/metadata/threshold" not in overlay.read_text(), overlay


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each panel query as a recording rule."""
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(queries.values())]}]}
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump(rules))
    result = run(PROMTOOL, "check", "rules", str(tmp_path / "dashboard.rules.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_layout_and_variables():
    """What Grafana needs to import it: unique panel ids, a 24-column grid without overlaps, every
    query on the chosen data source, and the variables the queries use."""
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and dashboard["uid"]
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        taken = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not taken & cells, f"{panel['title']} overlaps another panel"
        cells |= taken
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["definition"] == "label_values(esm_queue_wait_seconds_count, model)"
    used = set(re.findall(r"\$(\w+)", json.dumps([t["expr"] for p in panels for t in p["targets"]])))
    assert used <= set(variables) | {"__rate_interval"}


def test_selectors_are_found_in_promql():
    expr = ('sum by (model, le) (rate(esm_x_bucket{model=~"a|b"}[1m])) / clamp_min(sum(up), 1e-9) > 0.5 '
            'and on (pod) max by (pod) (kube_y{c="server"} == 3)')
    assert selectors(expr) == {'esm_x_bucket{model=~"a|b"}', "up", 'kube_y{c="server"}'}


# ---- Envoy's stats listener ------------------------------------------------------------------

def test_envoys_stats_listener_serves_prometheus_stats_and_nothing_else_of_admin(tmp_path):
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=free_port(),
                                       admin_socket=tmp_path / "admin.sock", stats_port=free_port()),
                         log_path=tmp_path / "envoy.log").wait_listening()
    try:
        stats = f"http://127.0.0.1:{envoy.config.stats_port}"
        wait_for(lambda: requests.get(f"{stats}/stats/prometheus", timeout=5).status_code == 200, timeout=30)
        page = requests.get(f"{stats}/stats/prometheus", timeout=5).text
        assert 'envoy_cluster_membership_healthy{envoy_cluster_name="esm2_grpc"}' in page
        for method, path in [("POST", "/quitquitquit"), ("POST", "/logging?level=trace"), ("GET", "/config_dump"),
                             ("GET", "/stats"), ("POST", "/stats/prometheus"), ("GET", "/stats/prometheus/../quitquitquit"),
                             ("POST", "/runtime_modify?a=b")]:
            response = requests.request(method, stats + path, timeout=5)
            assert response.status_code == 404, (method, path, response.status_code)
        assert envoy.proc.poll() is None  # /quitquitquit did not reach the admin interface
        assert requests.get(f"{stats}/stats/prometheus", timeout=5).status_code == 200
    finally:
        envoy.stop()


def test_a_stats_listener_needs_the_admin_socket():
    from gateway.envoy_config import render

    with pytest.raises(ValueError, match="--admin-socket"):
        render(GatewayConfig(stats_port=9901))


# ---- live: a real Prometheus scraping a server and Envoy -------------------------------------

class PrometheusProcess:
    """Prometheus on 127.0.0.1 with its data in a temporary directory, scraping every 0.5 s."""

    def __init__(self, directory: Path, targets: dict[str, tuple[str, str]], rule_file: Path):
        self.port = free_port()
        jobs = [{"job_name": job, "metrics_path": path, "static_configs": [{"targets": [target]}]}
                for job, (target, path) in targets.items()]
        config = {"global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
                  "rule_files": [str(rule_file)], "scrape_configs": jobs}
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = open(directory / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}"
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def api(self, path: str, **params):
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def finite_values(self, expr: str) -> list[float]:
        return [float(s["value"][1]) for s in self.api("query", query=expr)["result"]
                if math.isfinite(float(s["value"][1]))]

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self._log.close()


@pytest.fixture
def scraped(tmp_path, server):
    """The shared server and an Envoy (a tiny-model pool and the default pool) in front of it,
    both scraped by a real Prometheus that also evaluates the alert rules."""
    upstream = (("127.0.0.1", server.port),)
    envoy = EnvoyProcess(GatewayConfig(
        http_host="127.0.0.1", http_port=free_port(), admin_socket=tmp_path / "admin.sock", stats_port=free_port(),
        pools=(Pool("esm2-tiny", upstream), Pool(None, upstream))), log_path=tmp_path / "envoy.log")
    prometheus = None
    try:
        envoy.wait_listening()
        prometheus = PrometheusProcess(tmp_path, {
            "esm2-server": (f"127.0.0.1:{server.metrics_port}", "/metrics"),
            "esm2-envoy": (f"127.0.0.1:{envoy.config.stats_port}", "/stats/prometheus"),
        }, write_rules(tmp_path))
        wait_for(prometheus.ready, timeout=60)
        yield server, envoy, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        envoy.stop()


def as_live_query(selector: str) -> str:
    """count(selector), or for a failures-only selector the count of its metric by the labels it matches."""
    if selector not in FAILURES_ONLY:
        return f"count({selector})"
    name, matchers = selector.split("{", 1)
    labels = re.findall(r"(\w+)\s*=~?", matchers)
    return " and ".join(f"count({name}{{{label}!=\"\"}})" for label in labels)


def send_traffic(server, envoy, round_: int) -> None:
    """JSON calls through Envoy (new sequences each round, so they reach the model, and one repeated:
    a cache hit; one bad: a 400) and direct gRPC calls (one for a model that is not served)."""
    new = "MKTAYIAKQRQISFVK" + "ACDEFGHIKLMNPQRSTVWY"[round_ % 20] * (1 + round_ // 20)
    for model in ("esm2-tiny", "esm2-8m"):
        for sequences in ([new, "GSHMSLFD"], ["GSHMSLFD"]):
            ok = requests.post(f"{envoy.url}/api/v3/{model}/encode/", timeout=60,
                               json={"items": [{"sequence": s} for s in sequences]})
            assert ok.status_code == 200, ok.text
    bad = requests.post(f"{envoy.url}/api/v3/esm2-tiny/encode/", json={"items": [{"sequence": "MK1"}]}, timeout=60)
    assert bad.status_code == 400, bad.text
    server.stub.Encode(encode_request("esm2-tiny", ["MKTAYIAK"]), timeout=60)
    with pytest.raises(grpc.RpcError):
        server.stub.Encode(encode_request("esm2-none", ["MKTAYIAK"]), timeout=60)


@needs_prometheus
def test_every_dashboard_query_and_alert_selector_has_data_from_a_live_server_and_envoy(scraped):
    server, envoy, prometheus = scraped
    wait_for(lambda: {t["labels"]["job"]: t["health"] for t in prometheus.api("targets")["activeTargets"]}
             == {"esm2-server": "up", "esm2-envoy": "up"}, timeout=60)
    queries = dashboard_queries()
    alert_selectors = {name: selectors(rule["expr"]) for name, rule in alerts().items()}
    live = {f"{name}: {s}": as_live_query(s) for name, found in alert_selectors.items() for s in found
            if s.split("{")[0] not in KUBE_STATE_METRICS}
    missing = dict(queries, **live)
    deadline = time.monotonic() + 90
    for round_ in range(1000):
        if not missing or time.monotonic() > deadline:
            break
        send_traffic(server, envoy, round_)  # rates over 1m stay non-zero however long the polling takes
        sent = time.time()
        wait_for(lambda: min(prometheus.finite_values("timestamp(up)") or [0]) > sent + 0.5, timeout=30)
        missing = {name: expr for name, expr in missing.items() if not prometheus.finite_values(expr)}
    assert not missing, f"no data for: {json.dumps(missing, indent=1)}"
    # The dashboard's model variable (label_values of the queue wait count) lists every served model.
    models = prometheus.api("query", query="count by (model) (esm_queue_wait_seconds_count)")["result"]
    assert {m["metric"]["model"] for m in models} == {"esm2-tiny", "esm2-8m"}
    # Only the worker-lost alert reads kube-state-metrics, and nothing else is left unchecked.
    external = {name for name, found in alert_selectors.items() for s in found if s.split("{")[0] in KUBE_STATE_METRICS}
    assert external == {"ESM2WorkerLost"}
    # Prometheus evaluates every alert rule on these series without an error.
    def evaluated() -> list[dict]:
        rules = [r for g in prometheus.api("rules", type="alert")["groups"] for r in g["rules"]]
        return rules if all(r["lastEvaluation"] > "0001-01-01T00:00:00Z" for r in rules) else []
    wait_for(lambda: evaluated(), timeout=30)
    rules = evaluated()
    assert {r["name"] for r in rules} == set(alerts())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # Envoy's view: every pool has its one healthy replica, so that alert is quiet.
    healthy = prometheus.api("query", query='envoy_cluster_membership_healthy{envoy_cluster_name=~"pool_.+|esm2_grpc"}')
    assert {s["metric"]["envoy_cluster_name"]: s["value"][1] for s in healthy["result"]} == \
        {"pool_esm2-tiny": "1", "esm2_grpc": "1"}
