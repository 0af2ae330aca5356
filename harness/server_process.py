"""The server as a child process, for the tests and the benchmarks (not part of the package)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.processes import free_port, start_child, stop_process, stop_processes

REPO = Path(__file__).resolve().parent.parent
READY_LINE = "ready: serving"  # logged by service.server once every model is warm

__all__ = ["READY_LINE", "REPO", "ServerProcess", "free_port", "stop_process", "stop_processes"]


class ServerProcess:
    """`python -m service.server` on free 127.0.0.1 ports, logging to a file in log_dir."""

    def __init__(self, log_dir: Path, *args: str, env: dict | None = None, port: int | None = None,
                 metrics_port: int | None = None):
        """`port`/`metrics_port`: reuse a stopped replica's ports (a restart); default: free ones."""
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"server-{self.port}.log"
        for restart in range(1, 1000):  # a restarted replica logs to a new file
            if not self.log_path.exists():
                break
            self.log_path = Path(log_dir) / f"server-{self.port}-{restart}.log"
        self._log = open(self.log_path, "wb")
        self.proc = start_child(  # a killed test run leaves no server behind
            [sys.executable, "-m", "service.server", "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--offline", *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def wait_ready(self, timeout: float = 600):
        end = time.monotonic() + timeout
        while READY_LINE not in self.log():
            if self.proc.poll() is not None or time.monotonic() > end:
                log = self.log()
                self.stop()
                raise RuntimeError(f"server did not become ready (exit code {self.proc.returncode}):\n{log[-4000:]}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{label="value",...}': value}, labels sorted."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            sample.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}"
                           if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, labels: str = "") -> float:
        """One sample, e.g. metric("esm_items_total", 'model="esm2-8m"'); 0 when absent."""
        return self.metrics().get(f"{name}{{{labels}}}" if labels else name, 0.0)

    def stop(self, timeout: float = 60) -> int:
        code = stop_process(self.proc, timeout)
        self._log.close()
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
