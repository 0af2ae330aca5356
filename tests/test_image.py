"""The container image, built and run: deploy/Dockerfile built with podman (daemonless, as root,
vfs storage, chroot isolation) on a Debian base made here with debootstrap, since no image
registry can be reached. The CPU image runs non-root on a read-only root filesystem with a
random-weight checkpoint mounted read-only; its HEALTHCHECK passes, an Encode equals the direct
fair-esm reference, and `podman stop` drains: a request in flight when it stops still gets its answer.

The same image, under container limits: a --memory too small for the model stops start-up in
one line naming the limit; under a fitting one a burst of large per-token requests is refused
with RESOURCE_EXHAUSTED, never OOM-killed, and --cpus sets torch's threads. And deploy/compose.yaml
brought up with podman-compose: an encode through Envoy, a killed server restarted by its
restart policy, and nothing left once it is down.

Everything lives in this test's tmp directory (storage, base, build), nothing is cached across runs.
Skipped only where podman is not installed (.ci/run installs it).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import grpc
import numpy as np
import pytest
import requests
from reference import assert_close, reference
from support import REPO, encode_request, free_port, wait_for

from esm2_wire.proto import pb, pb_grpc

PODMAN = shutil.which("podman")
pytestmark = [
    pytest.mark.packaging,
    pytest.mark.timeout(1800),  # debootstrap, a torch image built and run on vfs: minutes
    pytest.mark.skipif(PODMAN is None, reason="podman is not installed (apt-get install podman runc debootstrap)"),
]

MODEL = "esm2-8m"  # the image's default ESM_MODELS
CHECKPOINT_FILES = "esm2_t6_8M_UR50D*.pt"
LAST_LAYER = 6
USER = "10001"  # the image's non-root user
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMSLFDFFKNKG", "ACDEFGHIKLMNPQRSTVWY"]
BASE_PACKAGES = "python3,python3-venv"  # Debian's python3.11 and its venv module


class Podman:
    """podman as root without a daemon, its storage under `root`: vfs (no overlay mounts needed),
    runc, cgroupfs (no systemd), no default ulimits (the sandbox refuses raising them)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "containers.conf"
        self.conf.write_text("[containers]\ndefault_ulimits = []\n")
        # podman refuses a runroot longer than 50 characters, which a parallel worker's tmp
        # directory (/tmp/pytest-of-root/pytest-N/popen-gwN/image0/run) is: a short one of its own.
        self.runroot = Path(tempfile.mkdtemp(prefix="esm2-podman-"))

    def remove_runroot(self) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)

    def __call__(self, *args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        command = [PODMAN, "--root", str(self.root / "storage"), "--runroot", str(self.runroot),
                   "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs", *args]
        result = subprocess.run(command, env={**os.environ, "CONTAINERS_CONF": str(self.conf)}, capture_output=True,
                                text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:2])} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result


def debian_base(podman: Podman, tmp: Path) -> str:
    """A bookworm root filesystem with python3 from Debian's packages, imported as an image."""
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    rootfs = tmp / "rootfs"
    result = subprocess.run([debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)  # the .debs
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    image = "localhost/esm2-test-base:bookworm"
    podman("import", "-", image, stdin=tar.stdout, timeout=600)
    assert tar.wait() == 0
    shutil.rmtree(rootfs)
    return image


def pip_configuration(tmp: Path) -> tuple[Path, list[str]]:
    """This machine's pip configuration (files and PIP_* variables, as `pip config list` shows it)
    as one pip.conf, and the local paths it names (wheel directories, file:// indexes, CA bundle,
    constraints), to mount read-only into the build at the same paths. Read at run time: no
    index address is written into any committed file."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True, timeout=60).stdout
    settings: dict[str, str] = {}
    for line in sorted(listed.splitlines(), key=lambda l: l.startswith(":env:")):  # variables win over files
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[1]] = value.strip().strip("'\"")
    mounts = set()
    for value in settings.values():
        for token in value.split():
            path = Path(urlparse(token).path) if token.startswith("file:") else Path(token)
            if not (path.is_absolute() and path.exists()):
                continue
            # A PEP 503 index's links are relative and commonly lead beside it (../../files/...).
            mounts.add(str(path.parent if path.name == "simple" else path))
    conf = tmp / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
    return conf, sorted(mounts)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image")
    podman = Podman(tmp)
    base = debian_base(podman, tmp)
    pip_conf, paths = pip_configuration(tmp)
    volumes = [f"--volume={pip_conf}:/etc/pip.conf:ro", *(f"--volume={p}:{p}:ro" for p in paths)]
    tag = "localhost/esm2-service:test-cpu"
    # Docker format: OCI images drop HEALTHCHECK. No intermediate images: vfs stores every layer as
    # a full copy of the tree, so each one costs the whole venv in disk and time. An empty
    # TORCH_INDEX_URL lets pip's configuration (mounted above) find the CPU wheel.
    podman("build", "--isolation", "chroot", "--format", "docker", "--layers=false",
           "--file", str(REPO / "deploy" / "Dockerfile"),
           "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_INDEX_URL=", *volumes, "--tag", tag,
           str(REPO), timeout=1500)
    yield podman, tag
    podman("rm", "--all", "--force", check=False, timeout=600)
    shutil.rmtree(tmp / "storage", ignore_errors=True)  # gigabytes of layer copies
    podman.remove_runroot()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, checkpoint_dir) -> Path:
    """The random-weight 8M-shape checkpoint, readable by the image's user (pytest's tmp dirs are 0700)."""
    directory = tmp_path_factory.mktemp("weights")
    directory.chmod(0o755)
    for path in checkpoint_dir.glob(CHECKPOINT_FILES):
        shutil.copy(path, directory / path.name)
        (directory / path.name).chmod(0o644)
    return directory


def test_cpu_image_serves_non_root_read_only_and_drains(image, models_dir, reference_models):
    podman, tag = image
    port, metrics_port = free_port(), free_port()
    name = "esm2-test"
    # Host networking: nothing to publish, and no iptables needed. Everything else is what a
    # hardened deployment sets: read-only root, no capabilities, no privilege escalation.
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--volume", f"{models_dir}:/models:ro",
           "--env", "ESM_HOST=127.0.0.1", "--env", f"ESM_PORT={port}", "--env", f"ESM_METRICS_PORT={metrics_port}",
           tag)
    try:
        def healthy() -> bool:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"container {state}:\n{podman('logs', name, check=False).stderr[-3000:]}"
            return podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0
        wait_for(healthy, timeout=300)

        # Non-root, and the root filesystem cannot be written.
        assert podman("exec", name, "id", "-u").stdout.strip() == USER
        assert podman("inspect", "--format", "{{.Config.User}}", tag).stdout.strip() == f"{USER}:{USER}"
        assert podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name).stdout.strip() == "true"
        refused = podman("exec", name, "sh", "-c", "touch /opt/venv/x", check=False)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.Esm2ServiceStub(channel)
            reply = stub.Encode(encode_request(MODEL, SEQUENCES), timeout=120)
            for sequence, result in zip(SEQUENCES, reply.results):
                want = reference(reference_models[MODEL], sequence)["mean"][LAST_LAYER]
                assert_close(result.embeddings[0].embedding, want, sequence)

            # Stop with a request in flight: the server finishes it before it exits (exit status 0).
            long = [("MKTAYIAKQR" * 100)[:-1] + letter for letter in "ACDEFGHI"]  # --max-items (8) of 1000 residues
            answered: list = []
            caller = threading.Thread(target=lambda: answered.append(
                stub.Encode(encode_request(MODEL, long), timeout=300)))
            caller.start()
            wait_for(lambda: not caller.is_alive() or _metric(metrics_port, "esm_worker_busy") > 0
                     or _metric(metrics_port, "esm_queue_items") > 0, timeout=60)
            assert caller.is_alive(), "the request finished before the stop: nothing to drain"
            podman("stop", "--time", "120", name, timeout=180)
            caller.join(60)
        assert answered and len(answered[0].results) == len(long)
        assert_close(answered[0].results[0].embeddings[0].embedding,
                     reference(reference_models[MODEL], long[0])["mean"][LAST_LAYER], long[0])
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        logs = podman("logs", name).stderr + podman("logs", name).stdout
        assert "shutting down: finishing in-flight requests" in logs and "service: stopped" in logs, logs[-3000:]
    finally:
        podman("rm", "--force", name, check=False)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


# ---- container limits (docs/deploy.md, "Container limits") -------------------------------------
def _wait_started(podman: Podman, name: str, timeout: float = 300) -> str:
    """The container's log once the server is ready or the container has stopped."""
    def settled() -> bool:
        logs = podman("logs", name, check=False)
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        return "ready: serving" in logs.stdout + logs.stderr or state != "running"
    wait_for(settled, timeout=timeout)
    logs = podman("logs", name, check=False)
    return logs.stdout + logs.stderr


def _run_server(podman: Podman, tag: str, name: str, models_dir: Path, *limits: str, env: dict[str, str]) -> None:
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", "--cap-drop", "ALL",
           "--volume", f"{models_dir}:/models:ro", *limits,
           *(f"--env={key}={value}" for key, value in {"ESM_HOST": "127.0.0.1", **env}.items()), tag)


def test_a_memory_limit_too_small_for_the_model_stops_start_up_in_one_line_naming_it(image, models_dir):
    """Before: the check read the host's MemAvailable, so in a container given 1 GiB the 8M model
    with its default budget (2.24 GiB with 2,048-residue attention maps) started, to be OOM-killed later."""
    podman, tag = image
    name = f"esm2-small-{os.getpid()}"
    _run_server(podman, tag, name, models_dir, "--memory", "1g",
                env={"ESM_PORT": str(free_port()), "ESM_METRICS_PORT": "0"})
    try:
        log = _wait_started(podman, name)
        assert "ready: serving" not in log, log[-3000:]
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "2", log[-3000:]
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1, log[-3000:]
        assert "models do not fit: cpu has" in errors[0], errors
        assert re.search(r"\(cgroup v[12] memory\.(max|limit_in_bytes) 1\.00 GiB, [0-9.]+ GiB in use", errors[0]), errors
    finally:
        podman("rm", "--force", name, check=False)


def _large_json_encode(port: int, index: int) -> tuple[str, str]:
    """EncodeJson (the JSON API's RPC) of 8 distinct 1,000-residue sequences, per-token for all 7
    layers (about 190 MB of JSON), read and dropped as it streams: (status, detail or retry-after)."""
    rng = np.random.default_rng(index)
    items = [{"sequence": "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 1000))} for _ in range(8)]
    request = pb.EncodeJsonRequest(model=MODEL)
    request.body.content_type = "application/json"
    request.body.data = json.dumps({"items": items, "params": {"include": ["per_token"],
                                                               "repr_layers": list(range(LAST_LAYER + 1))}}).encode()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = pb_grpc.Esm2ServiceStub(channel).EncodeJson(request, timeout=600)
        try:
            size = sum(len(message.data) for message in stream)
            return "OK", str(size)
        except grpc.RpcError as exc:
            return exc.code().name, dict(exc.trailing_metadata() or ()).get("retry-after", exc.details())


def test_under_limits_a_burst_is_refused_not_oom_killed_and_torch_follows_the_cpu_quota(image, models_dir):
    """Before: the JSON budget (1 GiB) and the result cache (512 MiB) ignored the container's limit;
    under 1 GiB this burst got the server OOM-killed (exit 137) in its second wave. torch ran as many
    threads as the host has cores, whatever --cpus said."""
    podman, tag = image
    # A quota below the host's cores, so that it shows (the issue's --cpus 2 on hosts of more than 2).
    cpus = max(1, min(2, len(os.sched_getaffinity(0)) - 1))
    name, port, metrics_port = f"esm2-limits-{os.getpid()}", free_port(), free_port()
    # 1,022-residue sequences at most: the 8M model and its batch need 0.6 GiB, which fits 1 GiB.
    _run_server(podman, tag, name, models_dir, "--memory", "1g", "--cpus", str(cpus),
                env={"ESM_PORT": str(port), "ESM_METRICS_PORT": str(metrics_port), "ESM_MAX_SEQUENCE_LENGTH": "1022"})
    try:
        log = _wait_started(podman, name)
        assert "ready: serving" in log, log[-3000:]
        assert f"torch threads {cpus} (from the CPU limit)" in log, log[-3000:]
        assert _metric(metrics_port, "esm_torch_threads") == cpus and _metric(metrics_port, "esm_cpu_limit") == cpus
        assert _metric(metrics_port, "esm_memory_limit_bytes") == 1 << 30
        statuses = []
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for wave in range(4):  # distinct sequences throughout: the result cache fills as it would
                answers = list(pool.map(lambda i: _large_json_encode(port, i), range(wave * 8, wave * 8 + 8)))
                state = podman("inspect", "--format", "{{.State.Status}} {{.State.OOMKilled}} {{.State.ExitCode}}",
                               name).stdout.strip()
                assert state == "running false 0", f"wave {wave}: {state}; answers {answers}"
                assert {code for code, _ in answers} <= {"OK", "RESOURCE_EXHAUSTED"}, answers
                assert any(code == "OK" for code, _ in answers), answers  # one response always fits
                statuses += answers
        refused = [detail for code, detail in statuses if code == "RESOURCE_EXHAUSTED"]
        assert refused and set(refused) == {"1"}, statuses  # the excess, each with retry-after: 1
    finally:
        podman("rm", "--force", name, check=False)


# ---- deploy/compose.yaml with podman-compose ---------------------------------------------------
def _compose_environment(podman: Podman, tmp: Path, tag: str, models_dir: Path, http_port: int) -> dict[str, str]:
    """podman-compose runs plain `podman`: the storage and engine settings of Podman's flags, as files."""
    storage = tmp / "storage.conf"
    storage.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{podman.root / "storage"}"\n'
                       f'runroot = "{podman.root / "run"}"\n')
    engine = tmp / "containers-compose.conf"
    engine.write_text('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(storage), "CONTAINERS_CONF": str(engine),
            "ESM_IMAGE": tag, "ESM_WEIGHTS": str(models_dir), "ESM_REPLICAS": "2", "ESM_HTTP_PORT": str(http_port)}


def test_compose_serves_through_envoy_restarts_a_killed_server_and_leaves_nothing(image, models_dir, reference_models,
                                                                                tmp_path):
    """Before: deploy/compose.yaml had only been parsed. Brought up, podman-compose 1.0.3 refused the
    second replica's list-form health check and created the weights' bind volume empty."""
    compose = shutil.which("podman-compose")
    if compose is None:
        pytest.skip("podman-compose is not installed (apt-get install podman-compose)")
    podman, tag = image
    http_port = free_port()
    project = f"esm2test{os.getpid()}"
    env = _compose_environment(podman, tmp_path, tag, models_dir, http_port)

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run([compose, "-f", str(REPO / "deploy" / "compose.yaml"), "-p", project, *args],
                                env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"podman-compose {args[0]}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def encode_through_envoy() -> bool:
        response = requests.post(f"http://127.0.0.1:{http_port}/api/v3/{MODEL}/encode/", timeout=60,
                                 json={"items": [{"sequence": SEQUENCES[0]}]})
        if response.status_code != 200:
            return False
        want = reference(reference_models[MODEL], SEQUENCES[0])["mean"][LAST_LAYER]
        assert_close(response.json()["results"][0]["embeddings"][0]["embedding"], want, SEQUENCES[0])
        return True

    def state(container: str) -> tuple[str, int, int]:
        fields = podman("inspect", "--format", "{{.State.Status}} {{.State.Pid}} {{.RestartCount}}",
                        container).stdout.split()
        return fields[0], int(fields[1]), int(fields[2])

    label = f"label=io.podman.compose.project={project}"
    run("up", "-d")
    try:
        wait_for(encode_through_envoy, "an encode through Envoy", timeout=300)
        victim = f"{project}_server_1"
        status, pid, restarts = state(victim)
        assert status == "running", status
        os.kill(pid, signal.SIGKILL)  # the server dies as in a crash; the engine restarts it
        wait_for(lambda: state(victim)[0] == "running" and state(victim)[2] > restarts and state(victim)[1] != pid,
                 lambda: f"{victim} restarted: {state(victim)}", timeout=120)
        wait_for(encode_through_envoy, "an encode through Envoy after the restart", timeout=300)
    finally:
        run("down", "--volumes", timeout=900)
        # podman-compose 1.0.3 (Debian bookworm) leaves the project's network behind after down.
        podman("network", "rm", "--force", f"{project}_default", check=False)
    for kind in ("ps", "network", "volume", "pod"):
        listed = podman(*((kind, "--all") if kind == "ps" else (kind, "ls")), "--filter", label, "--quiet").stdout.split()
        assert not listed, f"{kind}: {listed} left after down"
