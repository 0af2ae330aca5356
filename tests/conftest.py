"""Shared fixtures: random-weight checkpoints and real servers on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import requests

from service.checkpoints import load
from service.proto import pb, pb_grpc
from service.random_checkpoints import write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m service.server` in a subprocess, on free ports."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = tmp / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.server", "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--offline", *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.target = f"127.0.0.1:{self.port}"
        self.channel = None

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if "ready: serving" in self.log():
                self.channel = grpc.insecure_channel(
                    self.target, options=[("grpc.max_receive_message_length", 1 << 30)]
                )
                return self
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    @property
    def stub(self) -> pb_grpc.Esm2ServiceStub:
        return pb_grpc.Esm2ServiceStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """Current value of one Prometheus sample, e.g. metric("esm_items_total", 'model="esm2-tiny"')."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, timeout: float = 60) -> int:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """Random-weight checkpoints in fair-esm's format: tiny and the real 8M shape."""
    directory = tmp_path_factory.mktemp("checkpoints")
    write_random_checkpoint("tiny", directory, seed=1)
    write_random_checkpoint("8m", directory, seed=2)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_dir) -> Path:
    return checkpoint_dir / "esm2_t2_tiny_random.pt"


@pytest.fixture(scope="session")
def reference_models(checkpoint_dir, tiny_checkpoint):
    """Models loaded in the test process through the same loader, for direct fair-esm passes."""
    return {
        "esm2-tiny": load("esm2-tiny", tiny_checkpoint),
        "esm2-8m": load("esm2-8m", checkpoint_dir / "esm2_t6_8M_UR50D.pt"),
    }


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoint_dir, tiny_checkpoint):
    """A server with the tiny model as esm2-tiny and the 8M shape as esm2-8m."""
    proc = ServerProcess(
        tmp_path_factory.mktemp("server"),
        "--models", "esm2-tiny,esm2-8m",
        "--checkpoint", f"esm2-tiny={tiny_checkpoint}",
        "--model-dir", str(checkpoint_dir),
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
def stub(server) -> pb_grpc.Esm2ServiceStub:
    return server.stub


def encode_request(model: str, sequences, include=(), repr_layers=()) -> pb.EncodeRequest:
    return pb.EncodeRequest(
        model=model,
        params=pb.EncodeParams(include=list(include), repr_layers=list(repr_layers)),
        items=[pb.SequenceItem(sequence=s) for s in sequences],
    )
