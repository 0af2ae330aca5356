"""Failures real fleets see, with real processes on 127.0.0.1: replicas die and nobody restarts
them. Three replicas of one model behind one Envoy (as behind `gateway.launch --no-server --pool`,
where Kubernetes restarts pods later), and `gateway.launch --replicas 3` on one host.

Every answer is checked against a direct fair-esm forward pass; every failed request is counted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import requests
from reference import assert_close, reference
from support import REPO, ServerProcess, envoy_admin_get, envoy_counters, envoy_hosts, free_port, wait_for

from esm2_wire.proto import MODEL_HEADER, pb, pb_grpc
from gateway.envoy_config import HEALTH_CHECK_INTERVAL_S, GatewayConfig, Pool
from gateway.launch import FLEET_DRAIN_SECONDS, EnvoyProcess
from gateway.processes import stop_processes

pytestmark = pytest.mark.chaos

TINY = "esm2-tiny"
LAYER = 2  # the tiny model's last layer
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMSLFDFFKNKG", "MLKKV", "ACDEFGHIKLMNPQRSTVWY", "MKVL" * 6,
             "QQQWERTY", "MPEPTIDE", "KRKRKRKRKRAA"]
CLIENTS = 6  # closed loop, half JSON and half gRPC: at most 12 items queued, under QUEUE_ITEMS
MAX_ITEMS, QUEUE_ITEMS = 8, 24
# A bound on any one request: a hang fails the test instead of stalling it.
REQUEST_TIMEOUT_S = 30


# ---- steady load -----------------------------------------------------------------------
@dataclass
class SteadyLoad:
    """CLIENTS closed-loop clients through Envoy, JSON and gRPC alternately, until stopped.

    Every answer is compared with its reference; each failure is kept with the time it happened.
    """

    url: str
    expected: dict  # sequence -> mean embedding of LAYER
    done: int = 0
    failures: list = field(default_factory=list)  # (monotonic time, description)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.channel = grpc.insecure_channel(self.url.split("//")[1])
        self.stub = pb_grpc.Esm2ServiceStub(self.channel)
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _one(self, n: int, json_api: bool, session: requests.Session) -> None:
        sequences = [SEQUENCES[n % len(SEQUENCES)], SEQUENCES[(n * 3 + 1) % len(SEQUENCES)]]
        if json_api:
            response = session.post(f"{self.url}/api/v3/{TINY}/encode", timeout=REQUEST_TIMEOUT_S,
                                    json={"items": [{"sequence": s} for s in sequences]})
            assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:300]}"
            got = [r["embeddings"][0]["embedding"] for r in response.json()["results"]]
        else:
            request = pb.EncodeRequest(model=TINY, items=[pb.SequenceItem(sequence=s) for s in sequences])
            reply = self.stub.Encode(request, timeout=REQUEST_TIMEOUT_S, metadata=((MODEL_HEADER, TINY),))
            got = [list(r.embeddings[0].embedding) for r in reply.results]
        for g, s in zip(got, sequences):
            assert_close(g, self.expected[s], f"{s} (request {n})")

    def _client(self, index: int) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            with self._lock:
                if self.done >= 5000:  # a bound, whatever happens
                    return
                n = self.done
                self.done += 1
            try:
                self._one(n, index % 2 == 0, session)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and reported
                with self._lock:
                    self.failures.append((time.monotonic(), f"request {n}: {exc!r}"[:400]))

    def __enter__(self) -> "SteadyLoad":
        for thread in self.threads:
            thread.start()
        return self

    def wait_for(self, count: int, timeout: float = 120) -> None:
        wait_for(lambda: self.done >= count, timeout=timeout)

    def more(self, count: int) -> None:
        """Wait until `count` more requests have been sent."""
        self.wait_for(self.done + count)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S + 10)
        self.channel.close()

    def failed_after(self, moment: float) -> list[str]:
        return [text for at, text in self.failures if at >= moment]


@pytest.fixture(scope="module")
def expected(reference_models):
    return {s: reference(reference_models[TINY], s)["mean"][LAYER] for s in SEQUENCES}


# ---- three replicas behind one Envoy, nobody restarting them ---------------------------------
class Pool3:
    def __init__(self, tmp: Path, tiny_checkpoint: Path):
        self.tmp = tmp
        # Cache off: every request reaches a replica. A small queue, so that a lone survivor sheds.
        self.args = ("--models", TINY, "--checkpoint", f"{TINY}={tiny_checkpoint}", "--cache-mb", "0",
                     "--max-items", str(MAX_ITEMS), "--max-queue-items", str(QUEUE_ITEMS), "--max-batch-size", "4",
                     "--drain-seconds", str(FLEET_DRAIN_SECONDS), "--grace-seconds", "30")
        self.replicas = [ServerProcess(tmp, *self.args) for _ in range(3)]
        for replica in self.replicas:
            replica.wait_ready()
        self.envoy = EnvoyProcess(GatewayConfig(
            http_host="127.0.0.1", http_port=free_port(), admin_socket=tmp / "admin.sock",
            pools=(Pool(TINY, tuple(("127.0.0.1", r.port) for r in self.replicas)),),
        ), log_path=tmp / "envoy.log").wait_listening()
        for replica in self.replicas:
            self.wait_host(replica, "healthy")

    def host_flags(self, replica) -> str:
        """Envoy's health flags of one host ("healthy", "/failed_active_hc", ...)."""
        host = envoy_hosts(self.envoy.config.admin_socket).get(f"127.0.0.1:{replica.port}", {})
        return host.get("health_flags", "absent")

    def wait_host(self, replica, flags: str, timeout: float = 60) -> None:
        wait_for(lambda: self.host_flags(replica) == flags, timeout=timeout)

    def alive(self) -> list:
        return [r for r in self.replicas if r.proc.poll() is None]

    def down_to_one(self) -> ServerProcess:
        """Kill every replica but the last; wait until Envoy has taken them out of the pool."""
        for replica in self.alive()[:-1]:
            replica.proc.kill()
            replica.proc.wait()
        for replica in self.replicas[:-1]:
            wait_for(lambda: self.host_flags(replica) != "healthy", timeout=30)
        return self.replicas[-1]

    def stop(self) -> None:
        self.envoy.stop()
        stop_processes([r.proc for r in self.replicas])
        for replica in self.replicas:
            replica.stop()


@pytest.fixture(scope="module")
def pool3(tmp_path_factory, tiny_checkpoint):
    fleet = Pool3(tmp_path_factory.mktemp("chaos"), tiny_checkpoint)
    yield fleet
    fleet.stop()


def test_two_of_three_replicas_down_loses_nothing(pool3, expected):
    """Before: Envoy's default panic threshold (50%) balanced over dead hosts once fewer than half
    were healthy; requests failed with 503 'connection refused' until the end of the run."""
    first, second, survivor = pool3.replicas
    with SteadyLoad(pool3.envoy.url, expected) as load:
        load.wait_for(30)
        first.proc.kill()  # SIGKILL: its in-flight requests die with it; Envoy retries them elsewhere
        first.proc.wait()
        load.more(30)
        second.proc.send_signal(signal.SIGTERM)  # NOT_SERVING, drain window, then gone
        assert second.proc.wait(FLEET_DRAIN_SECONDS + 60) == 0
        pool3.wait_host(second, "/failed_active_hc")
        load.more(80)  # one healthy replica of three, nobody restarting the others
    assert not load.failures, f"{len(load.failures)} of {load.done} failed: {[t for _, t in load.failures[:5]]}"
    assert pool3.host_flags(survivor) == "healthy"


def _burst_item(n: int, letter: str) -> dict:
    return {"sequence": ("MKTAYIAKQR" * 40)[:-2] + "ACDEFGHIKLMNPQRSTVWY"[n % 20] + letter}


def test_an_overloaded_survivor_sheds_429_with_retry_after(pool3):
    """The last replica, flooded past its queue: 429 with Retry-After and BioLM's body, never a 5xx."""
    pool3.down_to_one()
    url = f"{pool3.envoy.url}/api/v3/{TINY}/encode"

    def post(n: int) -> requests.Response:  # MAX_ITEMS distinct sequences: no two share a queue place
        return requests.post(url, timeout=REQUEST_TIMEOUT_S * 2,
                             json={"items": [_burst_item(n, letter) for letter in "ACDEFGHI"[:MAX_ITEMS]]})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    shed = [r for r in responses if r.status_code == 429]
    assert shed, f"16 x {MAX_ITEMS} items against a queue of {QUEUE_ITEMS}: nothing shed ({statuses})"
    for response in shed:
        assert response.headers["retry-after"] == "1"
        assert response.json()["status_code"] == 429 and "busy" in response.json()["message"], response.text


def test_last_replica_gone_answers_503_at_once_then_200_once_one_is_back(pool3, expected):
    last = pool3.down_to_one()
    last.proc.kill()
    last.proc.wait()
    pool3.wait_host(last, "/failed_active_hc")
    channel = grpc.insecure_channel(pool3.envoy.url.split("//")[1])
    stub = pb_grpc.Esm2ServiceStub(channel)
    try:
        for _ in range(5):
            started = time.monotonic()
            response = requests.post(f"{pool3.envoy.url}/api/v3/{TINY}/encode", timeout=REQUEST_TIMEOUT_S,
                                     json={"items": [{"sequence": "MKT"}]})
            json_s = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["status_code"] == 503 and response.json()["message"], response.text
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as error:
                stub.Encode(pb.EncodeRequest(model=TINY, items=[pb.SequenceItem(sequence="MKT")]),
                            timeout=REQUEST_TIMEOUT_S, metadata=((MODEL_HEADER, TINY),))
            grpc_s = time.monotonic() - started
            assert error.value.code() is grpc.StatusCode.UNAVAILABLE, error.value
            # No hang and no retry loop against dead hosts: Envoy knows the pool is empty.
            assert json_s < 2 and grpc_s < 2, f"503 after {json_s:.2f}s (JSON), {grpc_s:.2f}s (gRPC)"

        # One replica back on its old port: 200s again once Envoy's next health check passes.
        pool3.replicas[-1] = back = ServerProcess(pool3.tmp, *pool3.args, port=last.port,
                                                  metrics_port=last.metrics_port)
        back.wait_ready()
        ready = time.monotonic()
        while True:
            response = requests.post(f"{pool3.envoy.url}/api/v3/{TINY}/encode", timeout=REQUEST_TIMEOUT_S,
                                     json={"items": [{"sequence": SEQUENCES[0]}]})
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            # The health-check interval, its jitter, and a second for a busy machine.
            assert time.monotonic() - ready < 2 * HEALTH_CHECK_INTERVAL_S + 1, "no 200 within the check interval"
            time.sleep(0.05)
        assert_close(response.json()["results"][0]["embeddings"][0]["embedding"], expected[SEQUENCES[0]],
                     SEQUENCES[0])
    finally:
        channel.close()


# ---- one host: gateway.launch --replicas 3 ----------------------------------------------
def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _replica_pid(launcher: subprocess.Popen, port: int) -> int:
    for pid in _children(launcher.pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"service.server" in argv and str(port).encode() in argv:
                return pid
    raise AssertionError(f"no replica on port {port} among the launcher's children")


@contextlib.contextmanager
def launched(tmp: Path, replicas: int, *server_args: str, ports: tuple[int, int] | None = None):
    """`python -m gateway.launch --replicas N`, its log in tmp; yields (process, http url, admin socket, port).
    `ports`: (HTTP port, first gRPC port), default free ones."""
    # The replicas take --port, --port + 1, ...
    http_port, grpc_port = ports or (free_port(), free_port(room=replicas))
    admin = tmp / "admin.sock"
    log = open(tmp / "launch.log", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gateway.launch", "--replicas", str(replicas), "--http-host", "127.0.0.1",
         "--http-port", str(http_port), "--admin-socket", str(admin), "--host", "127.0.0.1",
         "--port", str(grpc_port), "--metrics-port", "0", "--offline", *server_args],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield launcher, f"http://127.0.0.1:{http_port}", admin, grpc_port
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(FLEET_DRAIN_SECONDS + 60)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
        log.close()


def _clusters(admin: Path) -> str:
    with contextlib.suppress(OSError):
        return envoy_admin_get(admin, "/clusters", timeout=5)
    return ""


def _answered_by_replica(admin: Path, ports) -> dict[int, int]:
    """Calls each replica has answered (its rq_success in /clusters)."""
    hosts = envoy_hosts(admin)
    return {port: int(hosts.get(f"127.0.0.1:{port}", {}).get("rq_success", 0)) for port in ports}


def _retry_stats(admin: Path, model: str) -> dict[str, int]:
    """The pool's retry counters (retried, given up after every retry, refused by the retry budget),
    connection failures and outlier ejections by reason."""
    with contextlib.suppress(OSError):
        pattern = f"cluster.pool_{re.escape(model)}.(upstream_(rq_retry|cx_connect_fail)|outlier_detection.ejections)"
        return {name.rsplit(".", 1)[-1]: value for name, value in envoy_counters(admin, pattern, timeout=5).items()}
    return {}


def _wait_pool_healthy(launcher, admin: Path, model: str, ports, log: Path) -> None:
    def healthy() -> bool:
        assert launcher.poll() is None, log.read_text()[-3000:]
        clusters = _clusters(admin)
        return all(f"pool_{model}::127.0.0.1:{port}::health_flags::healthy" in clusters for port in ports)
    wait_for(healthy, timeout=120)


def test_launcher_outlives_a_killed_replica(tmp_path, tiny_checkpoint, expected):
    """Before: SIGKILL of one replica made the launcher stop the other two and Envoy."""
    with launched(tmp_path, 3, "--models", TINY, "--checkpoint", f"{TINY}={tiny_checkpoint}", "--cache-mb", "0") \
            as (launcher, url, admin, port):
        ports = [port, port + 1, port + 2]
        _wait_pool_healthy(launcher, admin, TINY, ports, tmp_path / "launch.log")
        with SteadyLoad(url, expected) as load:
            load.wait_for(30)
            # The victim dies within about a second of the pool turning healthy, as in a rolling
            # restart. Every replica /clusters calls healthy must already be in the balancer's
            # rotation: with Envoy's default 1 s update_merge_window the first healthy replica took
            # every call, the victim was killed while the balancer knew no other, and ~40% of the
            # calls in the next 0.6 s failed.
            answered = _answered_by_replica(admin, ports)
            assert all(answered.values()), f"replicas healthy in /clusters but not answering: {answered}"
            victim = _replica_pid(launcher, ports[1])
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            out = f"pool_{TINY}::127.0.0.1:{ports[1]}::health_flags::healthy"
            wait_for(lambda: out not in _clusters(admin), timeout=30)
            ejected = time.monotonic()
            load.more(80)
            assert launcher.poll() is None, "the launcher stopped when one replica died"
            retries = _retry_stats(admin, TINY)
        # Retries carry the killed replica's in-flight requests to the others: nothing fails, not even
        # in the window between the kill and the ejection (reported below). On a failure the message
        # says which replica each failed request last tried, how many tries it had, and whether the
        # retry budget overflowed.
        log = (tmp_path / "launch.log").read_text()
        failed_lines = [line for line in log.splitlines() if "tries=" in line and '" 200 ' not in line]
        assert not load.failures, (f"{len(load.failures)} of {load.done} failed: {[t for _, t in load.failures[:5]]}; "
                                   f"killed at {killed:.3f}; Envoy: {retries}; access log: {failed_lines[:10]}")
        print(f"ejection window: {ejected - killed:.2f}s from SIGKILL to Envoy marking the host unhealthy")
        assert f"replica 127.0.0.1:{ports[1]} (pid {victim}) exited with -9; 2 of 3 replicas left" in log, log[-3000:]
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(FLEET_DRAIN_SECONDS + 60) == 0
        log = (tmp_path / "launch.log").read_text()
        assert log.count("draining: NOT_SERVING") == 2 and log.count("service: stopped") == 2, log[-3000:]


def test_launcher_pools_are_the_models_files_models_and_it_exits_once_every_replica_is_gone(
        tmp_path, tiny_checkpoint, expected):
    """Before: with --models-file the pools came from --models' default (esm2-8m), whatever the file listed,
    and Envoy health-checked a model no replica served: every request got 503."""
    models_file = tmp_path / "models.toml"
    models_file.write_text(f'[models.{TINY}]\nsource = "{tiny_checkpoint}"\n')
    with launched(tmp_path, 2, "--models-file", str(models_file)) as (launcher, url, admin, port):
        _wait_pool_healthy(launcher, admin, TINY, [port, port + 1], tmp_path / "launch.log")
        assert "pool_esm2-8m" not in _clusters(admin)
        response = requests.post(f"{url}/api/v3/{TINY}/encode", json={"items": [{"sequence": SEQUENCES[1]}]},
                                 timeout=60)
        assert response.status_code == 200, response.text
        assert_close(response.json()["results"][0]["embeddings"][0]["embedding"], expected[SEQUENCES[1]], "")
        for replica_port in (port, port + 1):
            os.kill(_replica_pid(launcher, replica_port), signal.SIGKILL)
        assert launcher.wait(60) == 1
        assert "every replica has exited; stopping envoy" in (tmp_path / "launch.log").read_text()


def _alive(pid: int) -> bool:
    """Any of its threads still running. A dead process's leader can show as a zombie while its
    other threads are still exiting and its sockets still open, so each thread is looked at."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
    return any(state not in "ZX" for state in states)


def _bindable(port: int) -> bool:
    """A listener can take the port again (SO_REUSEADDR, as gRPC and Envoy bind: TIME_WAIT is no obstacle)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def test_a_killed_launcher_takes_its_children_with_it(tmp_path, tiny_checkpoint, expected):
    """Before: after a SIGKILL of the launcher its replicas and Envoy lived on with parent 1, kept
    serving and held their ports, so a new launch on the same ports could not start."""
    args = ("--models", TINY, "--checkpoint", f"{TINY}={tiny_checkpoint}", "--cache-mb", "0")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    with launched(first, 2, *args) as (launcher, url, admin, port):
        http_port, ports = int(url.rsplit(":", 1)[1]), [port, port + 1]
        _wait_pool_healthy(launcher, admin, TINY, ports, first / "launch.log")
        children = _children(launcher.pid)
        assert len(children) == 3, children  # two replicas and Envoy
        with SteadyLoad(url, expected) as load:
            load.wait_for(20)
            launcher.kill()  # as the OOM killer or a CI runner's cleanup would
            launcher.wait()
            # The kernel signals the children as the launcher dies; 2 s bounds their teardown.
            wait_for(lambda: not any(map(_alive, children)), lambda: f"children left: {[*filter(_alive, children)]}",
                     timeout=2)
    # Those requests failed: their gateway is gone. What matters is what comes next.
    held = [p for p in (http_port, *ports) if not _bindable(p)]
    assert not held, f"a killed launcher's ports are still held: {held}"
    with launched(second, 2, *args, ports=(http_port, port)) as (relaunched, url, admin, _):
        _wait_pool_healthy(relaunched, admin, TINY, ports, second / "launch.log")
        response = requests.post(f"{url}/api/v3/{TINY}/encode", json={"items": [{"sequence": SEQUENCES[0]}]},
                                 timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200, response.text
        assert_close(response.json()["results"][0]["embeddings"][0]["embedding"], expected[SEQUENCES[0]], "")


HARNESS_PARENT = """
import sys, threading, time
from pathlib import Path
from harness.server_process import ServerProcess
started = []
# From a thread that ends: the parent-death signal follows the forking thread, so the harness
# must fork from one that lives as long as the process.
thread = threading.Thread(target=lambda: started.append(ServerProcess(Path(sys.argv[1]), *sys.argv[2:]).wait_ready()))
thread.start()
thread.join()
print(started[0].proc.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_test_run_takes_its_harness_servers_with_it(tmp_path, tiny_checkpoint):
    """Before: a SIGKILLed test run (a CI runner's cleanup) left its servers running with parent 1."""
    parent = subprocess.Popen([sys.executable, "-c", HARNESS_PARENT, str(tmp_path), "--models", TINY, "--checkpoint",
                               f"{TINY}={tiny_checkpoint}"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        server = int(parent.stdout.readline())
        time.sleep(0.5)
        assert _alive(server), "the server died with the thread that started it"
    finally:
        parent.kill()
        parent.wait()
    try:
        wait_for(lambda: not _alive(server), f"server {server} gone", timeout=2)
    finally:
        if _alive(server):  # an orphan: stop it, not the next test
            os.kill(server, signal.SIGKILL)
