"""Real `python -m service.server` processes for the benchmark, on free local ports."""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc

from bench.machine import peak_rss_bytes
from harness.server_process import REPO, ServerProcess, free_port  # noqa: F401 (used by the cases)

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 64 << 20)]


class Server(ServerProcess):
    """One server subprocess serving one checkpoint under `model`; stop() it (or use `with`)."""

    def __init__(self, model: str, checkpoint: Path, *flags: str, ready_timeout: float = 600):
        self.model = model
        self.flags = flags
        self._dir = tempfile.TemporaryDirectory(prefix="esm-bench-server-")
        super().__init__(Path(self._dir.name), "--models", model, "--checkpoint", f"{model}={checkpoint}", *flags)
        self.wait_ready(ready_timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    def padding_counts(self) -> tuple[float, float, float]:
        """(residues, padded tokens, batches) run so far for this server's model."""
        samples, key = self.metrics(), f'{{model="{self.model}"}}'
        return tuple(samples.get(name + key, 0.0)
                     for name in ("esm_residues_total", "esm_padded_tokens_total", "esm_batches_total"))

    def peak_rss(self) -> int:
        return peak_rss_bytes(self.proc.pid)

    def stop(self, timeout: float = 60) -> int:
        code = super().stop(timeout)
        self._dir.cleanup()
        return code
