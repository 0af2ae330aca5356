"""The container image, built and run: deploy/Dockerfile built with podman (daemonless, as root,
vfs storage, chroot isolation) on a Debian base made here with debootstrap, since no image
registry can be reached. The CPU image runs non-root on a read-only root filesystem with a
random-weight checkpoint mounted read-only; its HEALTHCHECK passes, an Encode equals the direct
fair-esm reference, and `podman stop` drains: a request in flight when it stops still gets its answer.

Everything lives in this test's tmp directory (storage, base, build), nothing is cached across runs.
Skipped only where podman is not installed (.ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from reference import assert_close, reference
from support import REPO, encode_request, free_port, wait_for

from esm2_wire.proto import pb_grpc

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

    def __call__(self, *args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        command = [PODMAN, "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
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
