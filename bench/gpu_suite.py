"""The GPU suite: `python -m bench.run --device cuda --gpu-suite` (meant to finish in ~5 minutes on
one H100/H200).

In-process, at the 650M and 3B shapes (random weights through the service's loader), over a
log-normal mix: stock fair-esm fp32 and HF transformers sdpa (fp32 and bf16 autocast), each at
the token budget its sweep in the run finds best, against the service's forward (fast path, SDPA)
in fp32 and under bf16 and fp16 autocast at the same budgets, and the service's packed forward
(service.models.packed: no padding, varlen flash attention) under bf16 and fp16, each budget
warmed before it is timed; then the service's full request path (bench/gpu_service_path.py:
server and gRPC clients, one sweep of items per request). MFU is against the bf16 matmul rate
measured in the same run. `--device cpu --suite-models tiny` runs the same code on a CPU (a smoke
check of the harness, not a figure to publish).
"""

from __future__ import annotations

import gc
import logging

import torch

from bench import baseline, gpu_service_path, machine
from bench.cases import BASELINE_MEAN, PEER_BUDGETS, Measurement, workload_flops
from bench.hf_peer import HfPeer
from bench.machine import cpu_seconds
from bench.workload import mixed_workload
from service.models.checkpoints import load

log = logging.getLogger("bench.gpu")
STOCK = "stock fair-esm fp32"
AUTOCASTS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def require_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--gpu-suite --device {device}: no CUDA device is visible to torch {torch.__version__} "
                         f"(CUDA build: {torch.version.cuda or 'none, a CPU wheel'}). Run it on a GPU machine with a "
                         "CUDA build of torch, or pass --device cpu --suite-models tiny to smoke-test the harness.")


def run(args, run_info: dict, checkpoint_for) -> list[Measurement]:
    require_device(args.device)
    device = args.device
    run_info["matmul_flops_per_s"] = machine.matmul_rate(device, torch.bfloat16 if device != "cpu" else torch.float32,
                                                         n=8192 if device != "cpu" else 1024)
    run_info["matmul_precision"] = f"{'bf16' if device != 'cpu' else 'fp32'} on {device}"
    workload = mixed_workload(args.suite_sequences, args.seed, fixed=()).limited(
        1022, name=f"log-normal mix ({args.suite_sequences})")
    run_info["workloads"] = [workload.describe()]
    sample = workload.sequences[::4]
    budgets_tried = PEER_BUDGETS["cuda" if device != "cpu" else "cpu"]
    out: list[Measurement] = []
    workload_flops_of: dict[str, float] = {}
    for shape in [s.strip() for s in args.suite_models.split(",") if s.strip()]:
        name = f"esm2-{shape}"
        loaded = load(name, checkpoint_for(shape, args.cache_dir))
        loaded.model.to(device)
        hf = HfPeer(loaded, device)
        parity = hf.parity(loaded, workload.sequences[:4])
        runners = {
            STOCK: lambda seqs, b: baseline.stock_pass(loaded, seqs, toks_per_batch=b),
            **{f"HF transformers sdpa {p}": (lambda seqs, b, p=p: hf.mean_pass(seqs, b, AUTOCASTS[p]))
               for p in ("fp32", "bf16")},
            **{f"service forward, fast path (SDPA) {p}": (
                lambda seqs, b, p=p: baseline.service_forward_pass(loaded, seqs, True, b, AUTOCASTS[p]))
               for p in AUTOCASTS},
            **{f"service forward, packed (varlen) {p}": (
                lambda seqs, b, p=p: baseline.service_packed_pass(loaded, seqs, b, AUTOCASTS[p]))
               for p in ("bf16", "fp16")},
        }
        best = {}
        for case, runner in runners.items():  # each at its own best budget, swept on a quarter of the mix
            seconds = {b: _warm_then_time(runner, sample, b) for b in budgets_tried}
            best[case] = min(seconds, key=seconds.get)
            log.info("%s %s: best budget %d (%s)", name, case, best[case],
                     ", ".join(f"{b}: {sum(map(len, sample)) / s:,.0f} res/s" for b, s in seconds.items()))
        workload_flops_of[name] = workload_flops(loaded, workload)
        results = {case: Measurement(name, BASELINE_MEAN if case == STOCK else f"{case} (toks {best[case]})",
                                     workload.residues,
                                     flops=workload_flops_of[name],
                                     extra={"toks_per_batch": best[case], "hf_parity_vs_stock": parity})
                   for case in runners}
        for _ in range(args.repeats):
            for case, runner in runners.items():
                cpu = cpu_seconds()
                seconds = runner(workload.sequences, best[case])
                results[case].add(seconds, cpu_seconds() - cpu)
        out += results.values()
        del hf, loaded, runners
        gc.collect()
        if device != "cpu":
            torch.cuda.empty_cache()
        # The whole request path, with the device to itself (the in-process copies are gone).
        out += gpu_service_path.measure(name, checkpoint_for(shape, args.cache_dir), device, workload,
                                        args.repeats, workload_flops_of[name])
    return out


def _warm_then_time(runner, sample, budget: int) -> float:
    """One untimed pass at `budget` first: a larger budget's first batches grow the caching
    allocator's pool and pick cuBLAS/SDPA algorithms for new shapes; that belongs to no rate."""
    runner(sample, budget)
    return runner(sample, budget)

