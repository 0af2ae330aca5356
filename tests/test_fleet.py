"""A fleet behind one Envoy: three replicas of one model and a second model's pool, all real
processes on 127.0.0.1. Load spreads, a killed replica costs no request, a rolling restart
costs no request, every request reaches its own model's pool, a pool that is down answers
a prompt JSON 503.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import pytest
import requests
from support import REPO, ServerProcess, envoy_admin_get, envoy_counters, envoy_hosts, free_port, wait_for
from reference import assert_close, reference

from esm2_client import Esm2Client
from gateway.envoy_config import GatewayConfig, Pool
from gateway.launch import FLEET_DRAIN_SECONDS, EnvoyProcess
from esm2_wire.proto import MODEL_HEADER, pb, pb_grpc
from gateway.processes import stop_process, stop_processes

TINY, OTHER = "esm2-tiny", "esm2-8m"
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMSLFDFFKNKG", "MLKKV", "ACDEFGHIKLMNPQRSTVWY", "MKVL" * 6,
             "QQQWERTY", "MPEPTIDE", "KRKRKRKRKRAA"]
LAYER = 2  # the tiny model's last layer
MIN_REQUESTS = 200
CLIENTS = 16
# Each client pauses between requests: a steady load, not a saturating one, so that replicas
# restarting on a busy machine get the CPU to start.
PAUSE_S = 0.3


# ---- the fleet -----------------------------------------------------------------------
class Fleet:
    def __init__(self, tmp, tiny_checkpoint, checkpoint_dir):
        self.tmp = tmp
        # Cache off: the tests count the items each replica computes, and repeat their sequences.
        self.tiny_args = ("--models", TINY, "--checkpoint", f"{TINY}={tiny_checkpoint}", "--cache-mb", "0",
                          "--drain-seconds", str(FLEET_DRAIN_SECONDS), "--grace-seconds", "30")
        self.replicas = [ServerProcess(tmp, *self.tiny_args) for _ in range(3)]
        self.other = ServerProcess(tmp, "--models", OTHER, "--model-dir", str(checkpoint_dir), "--cache-mb", "0")
        for server in [*self.replicas, self.other]:
            server.wait_ready()
        self.envoy = EnvoyProcess(GatewayConfig(
            http_host="127.0.0.1", http_port=free_port(), admin_socket=tmp / "admin.sock",
            pools=(Pool(TINY, tuple(("127.0.0.1", r.port) for r in self.replicas)),
                   Pool(OTHER, (("127.0.0.1", self.other.port),))),
        ), log_path=tmp / "envoy.log").wait_listening()
        self.channel = grpc.insecure_channel(self.envoy.url.split("//")[1])
        self.stub = pb_grpc.Esm2ServiceStub(self.channel)
        for replica in self.replicas:
            self.wait_host(replica, "healthy")
        self.wait_host(self.other, "healthy")

    def host_flags(self, server) -> str:
        """Envoy's health flags of one upstream host ("healthy", "/failed_active_hc", ...)."""
        host = envoy_hosts(self.envoy.config.admin_socket).get(f"127.0.0.1:{server.port}", {})
        return host.get("health_flags", "absent")

    def health_check_failures(self, model: str) -> int:
        """Envoy's count of failed active health checks in `model`'s pool."""
        name = f"cluster.pool_{model}.health_check.failure"
        return envoy_counters(self.envoy.config.admin_socket, name).get(name, 0)

    def wait_host(self, server, flags: str, timeout: float = 60) -> None:
        wait_for(lambda: self.host_flags(server) == flags,
                 lambda: f"host {server.port} to be {flags!r}, not {self.host_flags(server)!r}", timeout)

    def restart(self, index: int) -> None:
        """Start replica `index` again on its ports; wait until Envoy sends it traffic."""
        old = self.replicas[index]
        self.replicas[index] = ServerProcess(self.tmp, *self.tiny_args, port=old.port,
                                             metrics_port=old.metrics_port).wait_ready()
        self.wait_host(self.replicas[index], "healthy")

    def stop(self) -> None:
        self.channel.close()
        self.envoy.stop()
        stop_processes([server.proc for server in [*self.replicas, self.other]])  # drain windows overlap
        for server in [*self.replicas, self.other]:
            server.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_checkpoint, checkpoint_dir):
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), tiny_checkpoint, checkpoint_dir)
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def solo(reference_models):
    """Each sequence alone through fair-esm: the mean embedding of the last layer, per model."""
    return {model: {s: reference(reference_models[model], s)["mean"] for s in SEQUENCES}
            for model in (TINY, OTHER)}


# ---- load ----------------------------------------------------------------------------
@dataclass
class Load:
    """CLIENTS threads sending JSON and gRPC requests through Envoy until stopped."""

    fleet: Fleet
    solo: dict
    minimum: int = MIN_REQUESTS  # requests sent before the load may stop
    done: int = 0
    failures: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _one(self, n: int, session: requests.Session) -> None:
        sequences = [SEQUENCES[n % len(SEQUENCES)], SEQUENCES[(n * 3 + 1) % len(SEQUENCES)]]
        want = [self.solo[TINY][s][LAYER] for s in sequences]
        if n % 2:
            response = session.post(f"{self.fleet.envoy.url}/api/v3/{TINY}/encode", timeout=60,
                                    json={"items": [{"sequence": s} for s in sequences]})
            assert response.status_code == 200, f"HTTP {response.status_code}: {response.text}"
            got = [r["embeddings"][0]["embedding"] for r in response.json()["results"]]
        else:
            request = pb.EncodeRequest(model=TINY, items=[pb.SequenceItem(sequence=s) for s in sequences])
            response = self.fleet.stub.Encode(request, timeout=60, metadata=((MODEL_HEADER, TINY),))
            got = [list(r.embeddings[0].embedding) for r in response.results]
        for g, w, s in zip(got, want, sequences):
            assert_close(g, w, f"{s} (request {n})")

    def _client(self, index: int) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            with self._lock:
                if self.done >= 20 * MIN_REQUESTS:  # a bound, whatever happens
                    return
                n = self.done
                self.done += 1
            try:
                self._one(n, session)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and reported
                with self._lock:
                    self.failures.append(f"request {n}: {exc!r}"[:500])
            self._stop.wait(PAUSE_S)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def wait_for(self, count: int, timeout: float = 120) -> None:
        wait_for(lambda: self.done >= count, lambda: f"{count} requests; {self.done} done", timeout)

    def __exit__(self, *exc) -> None:
        self.wait_for(self.minimum)
        self._stop.set()
        for thread in self.threads:
            thread.join(120)


def items_run(server) -> float:
    return server.metric("esm_items_total", f'model="{TINY}"')


def items_answered(server) -> float:
    """Items run, plus items that joined an identical one in flight (computed once for both)."""
    return items_run(server) + server.metric("esm_cache_merged_total")


# ---- tests ---------------------------------------------------------------------------
def test_load_spreads_over_replicas(fleet, solo):
    before = [items_answered(r) for r in fleet.replicas]
    with Load(fleet, solo, minimum=30) as load:
        load.wait_for(30)
    assert not load.failures, load.failures[:5]
    after = [items_answered(r) for r in fleet.replicas]
    worked = [a - b for a, b in zip(after, before)]
    assert all(w > 0 for w in worked), f"items answered per replica: {worked}"
    assert sum(worked) == 2 * load.done  # two sequences per request, each answered exactly once


def test_requests_land_on_their_own_pool(fleet, solo):
    tiny_before = sum(items_run(r) for r in fleet.replicas)
    other_before = fleet.other.metric("esm_items_total", f'model="{OTHER}"')
    for model in (TINY, OTHER):
        for s in SEQUENCES[:3]:
            response = requests.post(f"{fleet.envoy.url}/api/v3/{model}/encode", timeout=60,
                                     json={"items": [{"sequence": s}], "params": {"repr_layers": [1]}})
            assert response.status_code == 200, response.text
            assert_close(response.json()["results"][0]["embeddings"][0]["embedding"], solo[model][s][1], s)
            request = pb.EncodeRequest(model=model, items=[pb.SequenceItem(sequence=s)],
                                       params=pb.EncodeParams(repr_layers=[1]))
            result = fleet.stub.Encode(request, timeout=60, metadata=((MODEL_HEADER, model),)).results[0]
            assert_close(result.embeddings[0].embedding, solo[model][s][1], s)
    # Our client sends the header on every call, streams and ListModels included.
    with Esm2Client(fleet.envoy.url.split("//")[1]) as client:
        outputs = client.encode(OTHER, SEQUENCES[:3], include=["mean"], repr_layers=[1])
        for s, out in zip(SEQUENCES[:3], outputs):
            assert_close(out.mean[1], solo[OTHER][s][1], s)
    assert sum(items_run(r) for r in fleet.replicas) - tiny_before == 6
    assert fleet.other.metric("esm_items_total", f'model="{OTHER}"') - other_before == 9
    # The schema path names the model too.
    schema = requests.get(f"{fleet.envoy.url}/api/v3/schema/{OTHER}/encode", timeout=30)
    assert schema.status_code == 200 and OTHER in schema.text
    # gRPC without the header goes to the fallback pool (the first), which does not serve OTHER.
    with pytest.raises(grpc.RpcError) as error:
        fleet.stub.Encode(pb.EncodeRequest(model=OTHER, items=[pb.SequenceItem(sequence="MKT")]), timeout=30)
    assert error.value.code() is grpc.StatusCode.NOT_FOUND
    # An unknown model gets the server's 404, as from a single server.
    response = requests.post(f"{fleet.envoy.url}/api/v3/esm2-nope/encode", json={"items": [{"sequence": "MKT"}]},
                             timeout=30)
    assert response.status_code == 404 and "esm2-nope" in response.json()["message"]


@contextlib.contextmanager
def replica_back_afterwards(fleet, index: int):
    """Start replica `index` again when the test ends, failed or not: the fleet is shared by the
    module, and the next test must find every replica serving."""
    try:
        yield fleet.replicas[index]
    finally:
        fleet.replicas[index].stop()
        fleet.restart(index)  # back in the pool once it answers health checks


def test_sigkill_of_a_replica_under_load_loses_nothing(fleet, solo):
    with replica_back_afterwards(fleet, 1) as victim:
        with Load(fleet, solo) as load:
            load.wait_for(MIN_REQUESTS // 3)
            victim.proc.kill()  # SIGKILL: in-flight requests die with it; Envoy retries them elsewhere
            victim.proc.wait()
            load.wait_for(load.done + MIN_REQUESTS // 2)
        assert not load.failures, f"{len(load.failures)} of {load.done} failed: {load.failures[:5]}"
        assert load.done >= MIN_REQUESTS
        fleet.wait_host(victim, "/failed_active_hc")  # ejected, and stays out while down:
        failed = fleet.health_check_failures(TINY)  # only the victim fails its checks
        wait_for(lambda: fleet.health_check_failures(TINY) >= failed + 2, "two more failed health checks of the victim")
        assert fleet.host_flags(victim) != "healthy"


def test_sigterm_reports_not_serving_at_once_and_serves_through_the_drain_window(fleet, solo):
    with replica_back_afterwards(fleet, 0) as replica:
        health = health_pb2_grpc.HealthStub(replica.channel)
        replica.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service=TINY), timeout=10).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING after SIGTERM", timeout=10)
        # NOT_SERVING, yet still answering (directly, not through Envoy) inside the window.
        response = replica.stub.Encode(pb.EncodeRequest(model=TINY, items=[pb.SequenceItem(sequence=SEQUENCES[0])]),
                                       timeout=30)
        assert_close(response.results[0].embeddings[0].embedding, solo[TINY][SEQUENCES[0]][LAYER], SEQUENCES[0])
        assert replica.proc.poll() is None
        fleet.wait_host(replica, "/failed_active_hc")  # Envoy moved traffic away before the server stops
        assert replica.proc.wait(60) == 0


def test_rolling_restart_under_load_loses_nothing(fleet, solo):
    with Load(fleet, solo) as load:
        load.wait_for(30)
        for index in range(len(fleet.replicas)):
            old = fleet.replicas[index]
            started = time.monotonic()
            assert old.stop(timeout=60) == 0  # SIGTERM: NOT_SERVING, drain window, finish in-flight
            assert time.monotonic() - started >= FLEET_DRAIN_SECONDS
            fleet.restart(index)
            load.wait_for(load.done + 20)
    assert not load.failures, f"{len(load.failures)} of {load.done} failed: {load.failures[:5]}"
    assert load.done >= MIN_REQUESTS


def test_pool_with_every_replica_down_answers_503_at_once(fleet):
    stop_process(fleet.other.proc)
    fleet.wait_host(fleet.other, "/failed_active_hc")
    started = time.monotonic()
    response = requests.post(f"{fleet.envoy.url}/api/v3/{OTHER}/encode", json={"items": [{"sequence": "MKT"}]},
                             timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["message"], response.text
    assert elapsed < 10, f"503 took {elapsed:.1f}s"
    # The other pool is unaffected.
    response = requests.post(f"{fleet.envoy.url}/api/v3/{TINY}/encode", json={"items": [{"sequence": "MKT"}]},
                             timeout=60)
    assert response.status_code == 200, response.text


def test_launcher_runs_replicas_behind_one_envoy_and_stops_them_all(tmp_path, tiny_checkpoint):
    """`make fleet`: python -m gateway.launch --replicas N."""
    http_port, grpc_port = free_port(), free_port(room=2)  # the replicas take --port and --port + 1
    admin_socket = tmp_path / "admin.sock"
    log = open(tmp_path / "launch.log", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gateway.launch", "--replicas", "2", "--http-host", "127.0.0.1",
         "--http-port", str(http_port), "--admin-socket", str(admin_socket), "--host", "127.0.0.1",
         "--port", str(grpc_port), "--metrics-port", "0", "--models", TINY,
         "--checkpoint", f"{TINY}={tiny_checkpoint}", "--offline"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        def both_healthy() -> bool:  # both replicas healthy in the model's pool
            clusters = envoy_admin_get(admin_socket, "/clusters", timeout=5)
            return all(f"pool_{TINY}::127.0.0.1:{port}::health_flags::healthy" in clusters
                       for port in (grpc_port, grpc_port + 1))

        wait_for(lambda: launcher.poll() is not None or both_healthy(),
                 lambda: (tmp_path / "launch.log").read_text()[-3000:], timeout=120)
        assert launcher.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
        response = requests.post(f"http://127.0.0.1:{http_port}/api/v3/{TINY}/encode",
                                 json={"items": [{"sequence": "MKT"}]}, timeout=60)
        assert response.status_code == 200, response.text
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(120) == 0
        text = (tmp_path / "launch.log").read_text()
        assert text.count("draining: NOT_SERVING") == 2 and text.count("service: stopped") == 2
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        log.close()
