"""Cases for doing less work or cheaper work: stopping at the deepest layer asked for, int8 on
CPU, and the packed (unpadded) forward.

Every case here compares two or more ways of computing the same workload, run back to back
in each repeat (A, B, A, B, ...), and reports the per-repeat ratios of those pairs as well as
medians: on a shared machine whose load drifts over minutes, a pair compares like with like
where medians taken minutes apart may not.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.cases import Measurement
from bench.clients import drive
from bench.machine import cpu_seconds
from bench.servers import Server
from bench.workload import Workload
from esm2_wire.proto import pb

# ---- case labels (the report selects by them)
DEPTH_CASE = "gRPC Encode mean, repr_layers [{layer}], 4 clients x 1 item"


def depth_case(layer: int) -> str:
    return DEPTH_CASE.format(layer=layer)


def _requests(model: str, sequences, layer: int) -> list[pb.EncodeRequest]:
    return [pb.EncodeRequest(model=model, params=pb.EncodeParams(include=["mean"], repr_layers=[layer]),
                             items=[pb.SequenceItem(sequence=s)]) for s in sequences]


def _served(measurement: Measurement, server: Server, requests, clients: int) -> None:
    cpu = cpu_seconds() + cpu_seconds(server.proc.pid)
    result = drive(server, requests, clients)
    measurement.add(result.seconds, cpu_seconds() + cpu_seconds(server.proc.pid) - cpu)


def paired(numerator: Measurement, denominator: Measurement) -> list[float]:
    """numerator / denominator speed, one ratio per repeat (the two runs made back to back)."""
    return [(numerator.residues / a) / (denominator.residues / b)
            for a, b in zip(numerator.seconds, denominator.seconds)]


def early_exit(name: str, checkpoint: Path, device: str, server_args, workload: Workload, repeats: int,
               layer: int = 6) -> list[Measurement]:
    """The same sequences asked for the mean of `layer` and of the last layer (-1), on one server
    (cache off), interleaved. The service runs `layer` layers for the first: expect close to
    num_layers / layer."""
    shallow = Measurement(name, depth_case(layer), workload.residues, extra={"repr_layers": [layer]})
    full = Measurement(name, depth_case(-1), workload.residues, extra={"repr_layers": [-1]})
    with Server(name, checkpoint, "--device", device, "--cache-mb", "0", *server_args) as server:
        drive(server, _requests(name, workload.sequences[:2], -1), 2)  # warm
        for _ in range(repeats):
            _served(shallow, server, _requests(name, workload.sequences, layer), 4)
            _served(full, server, _requests(name, workload.sequences, -1), 4)
    shallow.extra["paired_speedup_vs_last_layer"] = paired(shallow, full)
    return [shallow, full]


def _ratio_cell(ratios: list[float]) -> str:
    return f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"


def markdown(measurements: list[Measurement]) -> list[str]:
    lines = []
    depth = [m for m in measurements if "paired_speedup_vs_last_layer" in m.extra]
    if depth:
        lines += ["", "Stopping at the deepest layer asked for: the same sequences, mean of one inner layer vs of "
                  "the last, one server (cache off), run back to back in every repeat. Ratio = median (min-max) "
                  "of the per-repeat ratios:", "",
                  "| model | case | residues/s | vs repr_layers [-1] |", "|---|---|---|---|"]
        for m in depth:
            lines.append(f"| {m.model} | {m.case} | {m.residues_per_s:,.0f} "
                         f"| {_ratio_cell(m.extra['paired_speedup_vs_last_layer'])} |")
    return lines
