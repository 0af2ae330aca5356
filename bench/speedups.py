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
INT8_SERVICE = "int8: service --precision int8, gRPC Encode mean 8 x 8"
FP32_SERVICE = "int8: service fp32, gRPC Encode mean 8 x 8"
HF_FP32 = "int8: HF EsmModel sdpa fp32 at its best token budget"
HF_INT8 = "int8: HF EsmModel sdpa, int8 as the service quantizes, same budget"
INT8_CASES = (INT8_SERVICE, FP32_SERVICE, HF_FP32, HF_INT8)
PACKED = "packed: service forward, packed, in-process, {budget} tokens per batch"
PADDED = "packed: service forward, padded (fast path), in-process, {budget} tokens per batch"


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


def int8(name: str, loaded, checkpoint: Path, server_args, workload: Workload, repeats: int,
         budgets=(1024, 2048, 4096)) -> list[Measurement]:
    """The service in int8 and in fp32 (one server each, cache off, 8 clients x 8-item mean
    requests), HF's EsmModel with sdpa in fp32 at the token budget its sweep finds best, and the
    same HF model with its Linear layers quantized as the service's are, at that budget: the four
    run back to back in every repeat. CPU only (int8 is)."""
    from bench.clients import encode_requests
    from bench.hf_peer import HfPeer

    hf = HfPeer(loaded, "cpu")
    sample = workload.sequences[::3]
    sweep = {budget: hf.mean_pass(sample, budget) for budget in budgets}
    best = min(sweep, key=sweep.get)
    hf_int8 = hf.quantized()
    results = {case: Measurement(name, case, workload.residues) for case in INT8_CASES}
    results[HF_FP32].extra.update(toks_per_batch=best, sweep_seconds={str(b): s for b, s in sweep.items()})
    results[HF_INT8].extra.update(toks_per_batch=best)
    requests = encode_requests(name, workload.sequences, 8)
    with Server(name, checkpoint, "--device", "cpu", "--cache-mb", "0", *server_args) as fp32_server, \
            Server(name, checkpoint, "--device", "cpu", "--cache-mb", "0", "--precision", "int8",
                   *server_args) as int8_server:
        for server in (fp32_server, int8_server):  # warm
            drive(server, encode_requests(name, workload.sequences[:8], 8), 1)
        hf.mean_pass(sample[:4], best)
        hf_int8.mean_pass(sample[:4], best)
        for _ in range(repeats):
            _served(results[INT8_SERVICE], int8_server, requests, 8)
            _served(results[FP32_SERVICE], fp32_server, requests, 8)
            for case, peer in ((HF_FP32, hf), (HF_INT8, hf_int8)):
                cpu = cpu_seconds()
                seconds = peer.mean_pass(workload.sequences, best)
                results[case].add(seconds, cpu_seconds() - cpu)
    service = results[INT8_SERVICE]
    service.extra["paired_vs"] = {case: paired(service, results[case]) for case in INT8_CASES[1:]}
    results[HF_INT8].extra["paired_vs"] = {HF_FP32: paired(results[HF_INT8], results[HF_FP32])}
    return list(results.values())


def packed(name: str, loaded, workload: Workload, repeats: int, budget: int = 1024) -> list[Measurement]:
    """The service's packed forward against its padded fast path, in-process, fp32, over the same
    sequences at the same token budget (padded: rows x longest; packed: real tokens), back to back."""
    from bench.baseline import service_forward_pass, service_packed_pass

    runs = {PACKED.format(budget=budget): lambda: service_packed_pass(loaded, workload.sequences, budget),
            PADDED.format(budget=budget): lambda: service_forward_pass(loaded, workload.sequences, True, budget)}
    results = {case: Measurement(name, case, workload.residues, extra={"toks_per_batch": budget}) for case in runs}
    for run in runs.values():  # warm
        run()
    for _ in range(repeats):
        for case, run in runs.items():
            cpu = cpu_seconds()
            seconds = run()
            results[case].add(seconds, cpu_seconds() - cpu)
    packed_case, padded_case = results.values()
    packed_case.extra["paired_vs_padded"] = paired(packed_case, padded_case)
    return list(results.values())


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
    packed_runs = [m for m in measurements if "paired_vs_padded" in m.extra]
    if packed_runs:
        lines += ["", "Packed vs padded forward on this CPU (in-process, fp32, same sequences and token budget, "
                  "back to back in every repeat; ratio = median (min-max) of the per-repeat ratios):", "",
                  "| model | case | residues/s | packed / padded |", "|---|---|---|---|"]
        for m in packed_runs:
            lines.append(f"| {m.model} | {m.case} | {m.residues_per_s:,.0f} "
                         f"| {_ratio_cell(m.extra['paired_vs_padded'])} |")
    by_model: dict[str, dict[str, Measurement]] = {}
    for m in measurements:
        if m.case in INT8_CASES and m.seconds:
            by_model.setdefault(m.model, {})[m.case] = m
    if by_model:
        lines += ["", "int8 on CPU: the service with `--precision int8` against the service in fp32, HF EsmModel "
                  "(sdpa) in fp32 at the token budget its sweep found best (in brackets), and the same HF model "
                  "with its Linear layers quantized exactly as the service's. Mean of the last layer; the four run "
                  "back to back in every repeat; ratio = median (min-max) of the per-repeat ratios:", "",
                  "| model | service int8 res/s | service fp32 | HF fp32 | HF int8 | int8 / service fp32 "
                  "| int8 / HF fp32 | int8 / HF int8 | HF int8 / HF fp32 |", "|---|---|---|---|---|---|---|---|---|"]
        for model, cases in by_model.items():
            ours = cases[INT8_SERVICE].extra["paired_vs"]
            hf8 = cases[HF_INT8].extra["paired_vs"][HF_FP32]
            lines.append(f"| {model} | {cases[INT8_SERVICE].residues_per_s:,.0f} "
                         f"| {cases[FP32_SERVICE].residues_per_s:,.0f} "
                         f"| {cases[HF_FP32].residues_per_s:,.0f} ({cases[HF_FP32].extra['toks_per_batch']}) "
                         f"| {cases[HF_INT8].residues_per_s:,.0f} | {_ratio_cell(ours[FP32_SERVICE])} "
                         f"| {_ratio_cell(ours[HF_FP32])} | {_ratio_cell(ours[HF_INT8])} | {_ratio_cell(hf8)} |")
    return lines
