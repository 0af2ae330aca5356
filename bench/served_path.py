"""Where the served path's time goes, against the same forward run in-process.

    python -m bench.served_path --models 8m,35m,150m [--rounds 3] [--clients 8 --items 8]

Each round runs, back to back on the same machine:
- in-process: the service's default CPU forward (packed, 1,024 tokens a batch) over the mix;
- served: the same mix as gRPC Encode mean requests (`--items` a request, `--clients` closed-loop
  client threads) to a server with default flags and the result cache off.

The served wall time is then split with the server's own counters:
- worker busy: esm_worker_seconds_total, the time the model worker spent running batches
  (forward, the copy out and pooling);
- of that, the forward: the in-process run's time for the same mix (the same batches when the
  server forms them from all requests at once; the batch counts are shown to check);
- idle: wall minus worker busy: the first request's arrival, batch formation, handing results back
  while nothing runs, and the last response's trip.
CPU seconds of the server and of the client threads show what ran beside torch's threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench import machine
from bench.baseline import packed_batches, service_packed_pass
from bench.clients import drive, encode_requests
from bench.machine import cpu_seconds
from bench.run import checkpoint_for, shapes
from bench.servers import Server
from bench.workload import mixed_workload
from service.models.checkpoints import load

BUDGET = 1024  # the server's CPU default (--max-batch-tokens device)


def _counters(server: Server, model: str) -> tuple[float, float]:
    samples = server.metrics()
    busy = sum(v for k, v in samples.items() if k.startswith("esm_worker_seconds_total{"))
    return busy, samples.get(f'esm_batches_total{{model="{model}"}}', 0.0)


def measure(shape: str, args, workload) -> dict:
    name = f"esm2-{shape}"
    checkpoint = checkpoint_for(shape, args.cache_dir)
    loaded = load(name, checkpoint)
    requests = encode_requests(name, workload.sequences, args.items)
    rounds = []
    with Server(name, checkpoint, "--max-sequence-length", "2048", "--cache-mb", "0") as server:
        drive(server, requests, args.clients)  # warm: connections, allocator, thread pools
        service_packed_pass(loaded, workload.sequences, BUDGET)
        for _ in range(args.rounds):
            in_process = service_packed_pass(loaded, workload.sequences, BUDGET)
            busy, batches = _counters(server, name)
            server_cpu, client_cpu = cpu_seconds(server.proc.pid), cpu_seconds()
            wall = drive(server, requests, args.clients).seconds
            busy_after, batches_after = _counters(server, name)
            rounds.append({"in_process_s": in_process, "served_s": wall, "worker_busy_s": busy_after - busy,
                           "batches": batches_after - batches,
                           "server_cpu_s": cpu_seconds(server.proc.pid) - server_cpu,
                           "client_cpu_s": cpu_seconds() - client_cpu})
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    median["ratio_pairs"] = [r["in_process_s"] / r["served_s"] for r in rounds]
    median["in_process_batches"] = len(packed_batches(workload.sequences, BUDGET))
    return median


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.served_path", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="8m,35m,150m")
    p.add_argument("--sequences", type=int, default=24, help="log-normal sequences (plus the fixed ones)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=Path("bench/.cache"))
    args = p.parse_args(argv)
    workload = mixed_workload(args.sequences, 0)
    print(machine.headline())
    print(f"{workload.describe()}; {args.clients} clients x {args.items} items; median of {args.rounds} rounds\n")
    print("| model | in-process forward s | served s | served / in-process speed, pairs | worker busy s "
          "| busy - forward s | idle s | batches served (in-process) | server CPU s | client CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes(args.models):
        m = measure(shape, args, workload)
        pairs = m["ratio_pairs"]
        print(f"| esm2-{shape} | {m['in_process_s']:.2f} | {m['served_s']:.2f} | {statistics.median(pairs):.3f} "
              f"({min(pairs):.3f}-{max(pairs):.3f}) | {m['worker_busy_s']:.2f} "
              f"| {m['worker_busy_s'] - m['in_process_s']:+.2f} | {m['served_s'] - m['worker_busy_s']:.2f} "
              f"| {m['batches']:.0f} ({m['in_process_batches']}) | {m['server_cpu_s']:.2f} | {m['client_cpu_s']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
