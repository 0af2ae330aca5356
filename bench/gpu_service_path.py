"""The service's full request path for the GPU suite: a real server (`--device` as the suite's,
precision `auto`) and closed-loop gRPC clients, beside the suite's forward-only figures. One
sweep over the items per request (the batch size the server can form from concurrent callers),
so that what the server adds (queueing, batching, host copies, serialization) shows against
the bare forward at the same residues. Afterwards, the server's peak device memory against its
start-up estimate (the `esm_device_memory_*_bytes` gauges).
"""

from __future__ import annotations

import logging
from pathlib import Path

from bench.cases import Measurement
from bench.clients import drive, encode_requests
from bench.machine import cpu_seconds
from bench.servers import Server
from bench.workload import Workload

log = logging.getLogger("bench.gpu")
ITEMS_PER_REQUEST = (1, 8, 32)  # the sweep
CLIENTS = 4  # concurrent callers: with 32 items each, enough for full 8,192-token batches
WARM_REQUESTS = 8


def measure(name: str, checkpoint: Path, device: str, workload: Workload, repeats: int,
            flops: float, items_per_request: tuple[int, ...] = ITEMS_PER_REQUEST) -> list[Measurement]:
    out = []
    with Server(name, checkpoint, "--device", device, "--cache-mb", "0") as server:  # metrics on: memory gauges
        for items in items_per_request:
            work = encode_requests(name, workload.sequences, items)
            drive(server, work[:WARM_REQUESTS], CLIENTS)  # warm: this request shape's batches and buffers
            m = Measurement(name, f"service full path: server + {CLIENTS} gRPC clients, {items} items/request",
                            workload.residues, flops=flops,
                            extra={"items_per_request": items, "clients": CLIENTS, "precision": "auto"})
            for _ in range(repeats):
                cpu = cpu_seconds() + cpu_seconds(server.proc.pid)
                result = drive(server, work, CLIENTS)
                m.add(result.seconds, cpu_seconds() + cpu_seconds(server.proc.pid) - cpu)
                m.response_bytes = result.response_bytes
            log.info("%s %s: %.0f res/s", name, m.case, m.residues_per_s)
            out.append(m)
        samples = server.metrics()
        memory = {kind: samples.get(f'esm_device_memory_{kind}_bytes{{device="{device}"}}')
                  for kind in ("peak", "estimate")}
        for m in out:
            m.extra.update({"device_memory_peak_bytes": memory["peak"], "device_memory_estimate_bytes": memory["estimate"]})
    return out
