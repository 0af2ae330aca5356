"""Streaming throughput for a reader that keeps up, this checkout against another (issue 16).

    python -m bench.stream_throughput --base /tmp/base-checkout --repeats 8

Both checkouts serve the same random-weight 8M checkpoint, each with its own server and Envoy
(rendered by that checkout's gateway.envoy_config), side by side. A reader that keeps up reads
one EncodeStream of 8 x 2,048 residues with per_token for all 7 layers (147 MB of float32; the
first read warms the result cache, so the model is not what is timed), straight from the server
and through Envoy. Runs alternate between the checkouts (ABBA order), so that a machine loaded by
others slows both alike; the report gives the median MB/s of each and the ratio of the two
reads of each repeat (median and quartiles).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.servers import CHANNEL_OPTIONS
from esm2_wire.proto import pb, pb_grpc
from gateway.processes import stop_process
from harness.server_process import READY_LINE, REPO, free_port
from service.models.random_checkpoints import write_random_checkpoint

LAYERS = list(range(7))


def stream_request(items: int) -> pb.EncodeStreamRequest:
    sequence = "".join(np.random.default_rng(0).choice(list("ACDEFGHIKLMNPQRSTVWY"), 2048))
    return pb.EncodeStreamRequest(model="esm2-8m", params=pb.EncodeParams(include=["per_token"], repr_layers=LAYERS),
                                  items=[pb.SequenceItem(sequence=sequence)] * items)


class Checkout:
    """A server and an Envoy of one checkout (its own code, run from its directory)."""

    def __init__(self, name: str, repo: Path, checkpoint_dir: Path, log_dir: Path):
        self.name = name
        port, metrics_port = free_port(), free_port()
        self.server_log = Path(log_dir) / f"server-{name}.log"
        self._server_log = open(self.server_log, "wb")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "service.server", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
             str(metrics_port), "--offline", "--models", "esm2-8m", "--model-dir", str(checkpoint_dir)],
            cwd=repo, stdout=self._server_log, stderr=subprocess.STDOUT)
        while READY_LINE not in self.server_log.read_text(errors="replace"):
            if self.server.poll() is not None:
                raise RuntimeError(f"{name}'s server exited:\n{self.server_log.read_text()[-3000:]}")
            time.sleep(0.1)
        target = f"127.0.0.1:{port}"
        self.http_port = free_port()
        config = Path(log_dir) / f"envoy-{name}.yaml"
        config.write_text(subprocess.run(
            [sys.executable, "-m", "gateway.envoy_config", "--http-host", "127.0.0.1", "--http-port",
             str(self.http_port), "--upstream", target], cwd=repo, check=True, capture_output=True,
            text=True).stdout)
        from gateway.launch import envoy_binary, log_flags
        self._envoy_log = open(Path(log_dir) / f"envoy-{name}.log", "wb")
        self.envoy = subprocess.Popen([envoy_binary(), "-c", str(config), "--disable-hot-restart", *log_flags("warning")],
                                      stdout=self._envoy_log, stderr=subprocess.STDOUT)
        self.targets = {"direct": target, "Envoy": f"127.0.0.1:{self.http_port}"}

    def read(self, path: str, request) -> float:
        """MB/s of one stream read as it arrives."""
        with grpc.insecure_channel(self.targets[path], options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.Esm2ServiceStub(channel)
            started = time.perf_counter()
            received = sum(len(m.chunk.data) for m in stub.EncodeStream(request, timeout=300, wait_for_ready=True))
            return received / 1e6 / (time.perf_counter() - started)

    def stop(self) -> None:
        self.envoy.terminate()
        self.envoy.wait()
        self._envoy_log.close()
        stop_process(self.server)
        self._server_log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout (protos generated)")
    parser.add_argument("--repeats", type=int, default=8, help="reads per checkout and path")
    parser.add_argument("--items", type=int, default=8)
    args = parser.parse_args(argv)
    request = stream_request(args.items)
    with tempfile.TemporaryDirectory(prefix="esm-stream-bench-") as tmp:
        write_random_checkpoint("8m", Path(tmp), seed=2)
        checkouts = [Checkout("base", args.base.resolve(), Path(tmp), Path(tmp)),
                     Checkout("this", REPO, Path(tmp), Path(tmp))]
        try:
            for checkout in checkouts:  # warm: the model's results into the cache, connections up
                for path in checkout.targets:
                    checkout.read(path, request)
            seen: dict[tuple[str, str], list[float]] = {}
            for repeat in range(args.repeats):
                order = checkouts if repeat % 2 == 0 else checkouts[::-1]  # ABBA
                for path in ("direct", "Envoy"):
                    for checkout in order:
                        seen.setdefault((checkout.name, path), []).append(checkout.read(path, request))
        finally:
            for checkout in checkouts:
                checkout.stop()
    print("| path | base MB/s (median) | this MB/s (median) | this / base, paired per repeat: median (quartiles) | runs each |")
    print("| --- | --- | --- | --- | --- |")
    for path in ("direct", "Envoy"):
        base, this = seen[("base", path)], seen[("this", path)]
        ratios = statistics.quantiles([t / b for t, b in zip(this, base)], n=4)
        print(f"| {path} | {statistics.median(base):.0f} | {statistics.median(this):.0f} | "
              f"{ratios[1]:.2f} ({ratios[0]:.2f}-{ratios[2]:.2f}) | {args.repeats} |")
    for key, values in seen.items():
        print(key, " ".join(f"{v:.0f}" for v in values), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
