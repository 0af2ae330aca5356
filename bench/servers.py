"""Real `python -m service.server` processes for the benchmark, on free local ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.machine import peak_rss_bytes

REPO = Path(__file__).resolve().parent.parent
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 64 << 20)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One server subprocess serving one checkpoint under `model`; stop() it (or use `with`)."""

    def __init__(self, model: str, checkpoint: Path, *flags: str, ready_timeout: float = 600):
        self.model = model
        self.flags = flags
        self.metrics_port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="esm-bench-server-")
        port_file = Path(self._dir.name) / "port"
        self.log_path = Path(self._dir.name) / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.server", "--host", "127.0.0.1", "--port", "0",
                 "--metrics-port", str(self.metrics_port), "--port-file", str(port_file), "--offline",
                 "--models", model, "--checkpoint", f"{model}={checkpoint}", *flags],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        end = time.monotonic() + ready_timeout
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None or time.monotonic() > end:
                log = self.log_path.read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"server {model} {' '.join(flags)} did not start:\n{log[-4000:]}")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{port_file.read_text().strip()}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    def counters(self) -> dict[str, float]:
        """Prometheus samples of this server as {"name{label=value}": value}."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples

    def padding_counts(self) -> tuple[float, float, float]:
        """(residues, padded tokens, batches) run so far for this server's model."""
        c = self.counters()
        key = f"{{model={self.model}}}"
        return c.get("esm_residues_total" + key, 0.0), c.get("esm_padded_tokens_total" + key, 0.0), \
            c.get("esm_batches_total" + key, 0.0)

    def peak_rss(self) -> int:
        return peak_rss_bytes(self.proc.pid)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._dir.cleanup()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
