"""Entry point of `make bench`: python -m bench.run [--quick] [options]; see BENCHMARKS.md."""

from __future__ import annotations

import argparse
import gc
import logging
import shlex
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import cases, machine, report, scheduling, speedups
from bench.clients import drive, encode_requests
from bench.workload import Workload, mixed_workload, write_fasta
from service.models.checkpoints import load
from service.models.random_checkpoints import SHAPES, write_random_checkpoint

log = logging.getLogger("bench")
HERE = Path(__file__).resolve().parent
# --cases: groups of the per-model cases, plus the --mfu-models and --rss-models runs.
CASE_GROUPS = ("baseline", "forward", "grpc", "stream", "json", "latency", "peer", "hf", "ort", "mfu", "rss", "hol",
               "cache", "depth", "int8", "packed")
SPEED_GROUPS = ("depth", "int8", "packed")  # bench/speedups.py: each a comparison of its own
SERVED_GROUPS = {"grpc", "stream", "json", "latency", "peer", "hf", "ort"}  # the ones that need a server


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny model, a few sequences, one repeat (seconds to a minute or two)")
    p.add_argument("--models", default="8m,35m", help="shapes that get every case (random weights)")
    p.add_argument("--mfu-models", default="150m",
                   help="shapes that get baseline, in-process forward and gRPC 8x8 only (model FLOPs utilisation)")
    p.add_argument("--rss-models", default="150m,650m", help="shapes whose server peak RSS is measured alone")
    p.add_argument("--cases", default="all",
                   help=f"comma-separated subset of: {', '.join(CASE_GROUPS)} (default all); e.g. 'peer' times only "
                        "esm-extract vs esm2 embed on --models. mfu and rss are the --mfu-models/--rss-models runs")
    p.add_argument("--depth-shape", default="650m",
                   help="depth case: this shape asked for repr_layers [6] and [-1], same sequences")
    p.add_argument("--depth-sequences", type=int, default=4, help="log-normal sequences of the depth case")
    p.add_argument("--int8-models", default="35m,150m",
                   help="int8 case: service int8 vs service fp32 vs HF sdpa fp32 (best budget) vs HF int8")
    p.add_argument("--int8-sequences", type=int, default=16, help="log-normal sequences of the int8 case")
    p.add_argument("--packed-models", default="8m,35m", help="packed case: packed vs padded forward, in-process")
    p.add_argument("--contacts-memory", action="store_true",
                   help="opt-in: stock vs ours contacts peak RSS, and a served long contacts request (slow)")
    p.add_argument("--contacts-shape", default="650m")
    p.add_argument("--contacts-compare-length", type=int, default=512,
                   help="length for the stock-vs-ours comparison (stock at 1000 residues needs ~18 GB)")
    p.add_argument("--contacts-serve-length", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=24, help="log-normal sequences in the mix (plus 8x300, 1000, 2048)")
    p.add_argument("--mfu-sequences", type=int, default=8)
    p.add_argument("--contacts-max-length", type=int, default=512,
                   help="contacts cases use the mix's sequences up to this length (stock stacks every layer's maps)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3; --gpu-suite: 1)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--items", default="8,1")
    p.add_argument("--latency-requests", type=int, default=100)
    p.add_argument("--hol-length", type=int, default=2048,
                   help="hol case: residues of each of the huge request's 3 items (every output)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: baseline, in-process forward and servers")
    p.add_argument("--gpu-suite", action="store_true",
                   help="the GPU suite instead of the cases (bench/gpu_suite.py): --suite-models in-process, "
                        "fp32/bf16/fp16 vs stock fp32 fair-esm and HF sdpa, MFU against the measured bf16 matmul rate")
    p.add_argument("--suite-models", default=None,
                   help="shapes of --gpu-suite, checked before any work (default 650m,3b; --quick 650m; --dry-run tiny)")
    p.add_argument("--dry-run", action="store_true",
                   help="--gpu-suite: every step at the tiny shape on the tests' simulated CUDA device (no GPU)")
    p.add_argument("--suite-sequences", type=int, default=128, help="log-normal sequences of --gpu-suite")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="the service's autocast precision (the stock baseline stays fp32)")
    p.add_argument("--server-args", default="", help="extra flags for every server, e.g. '--max-batch-tokens 2048'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache", help="random-weight checkpoints")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.gpu_suite else 3  # the GPU suite's budget: 4 minutes on one H100
    args.cases = set(CASE_GROUPS) if args.cases == "all" else {c.strip() for c in args.cases.split(",") if c.strip()}
    if args.cases - set(CASE_GROUPS):
        p.error(f"unknown --cases {', '.join(sorted(args.cases - set(CASE_GROUPS)))}; choose from {', '.join(CASE_GROUPS)}")
    if args.quick:
        args.models, args.mfu_models, args.rss_models = "tiny", "", ""
        # The contacts memory smoke goes with the per-model cases, not with the speed cases alone.
        args.contacts_memory, args.contacts_shape = not args.cases <= set(SPEED_GROUPS), "tiny"
        args.contacts_compare_length, args.contacts_serve_length = 100, 300
        args.sequences, args.repeats, args.latency_requests = 6, 1, 20
        args.hol_length = 300
        args.depth_shape, args.depth_sequences = "tiny", 4
        args.int8_models, args.int8_sequences = "tiny", 8
        args.packed_models = "tiny"
    return args


def shapes(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    return names


def checkpoint_for(shape: str, cache: Path, device: str | torch.device = "cpu") -> Path:
    path = cache / f"{SHAPES[shape][3]}.pt"
    if not path.exists():
        log.info("writing a random-weight %s checkpoint to %s (made on %s)", shape, cache, device)
        write_random_checkpoint(shape, cache, device=device)
    return path


def served_name(shape: str) -> str:
    return f"esm2-{shape}"


def warm(model_cases: cases.ModelCases, workload: Workload) -> None:
    """First calls pay one-off costs (allocator growth, thread pools); keep them out of run 1."""
    from bench import baseline

    sample = workload.sequences[:16]
    baseline.stock_pass(model_cases.loaded, sample)
    baseline.service_forward_pass(model_cases.loaded, sample, fast=True)
    for mode in model_cases.servers:
        drive(model_cases.servers[mode], encode_requests(model_cases.name, sample, 8), 2)


def full_cases(m: cases.ModelCases, clients, items, groups) -> list:
    # The service's 8x8 case runs right after the peers, so that each repeat gives a back-to-back
    # pair (report.paired_ratios); with "hf" it runs there even when "grpc" is not asked for.
    pairs = [(c, i) for i in items for c in clients]
    steps = [("baseline", m.baseline_mean), ("hf", m.peers_mean), ("ort", m.ort_mean)]
    if groups & {"hf", "ort"}:
        steps.append(("hf" if "hf" in groups else "ort", lambda: m.grpc_mean(8, 8)))
        pairs = [p for p in pairs if p != (8, 8)]
    steps += [("forward", m.forward_fast), ("forward", m.forward_exact)]
    steps += [("grpc", lambda c=c, i=i: m.grpc_mean(c, i)) for c, i in pairs]
    steps += [("grpc", lambda: m.grpc_mean(8, 8, "exact")), ("stream", lambda: m.stream("per_token")),
              ("stream", lambda: m.stream("logits")), ("baseline", m.baseline_contacts),
              ("stream", lambda: m.stream("contacts")), ("json", lambda: m.json("mean")),
              ("json", lambda: m.json("per_token")), ("peer", m.peer), ("hf", m.peer_logits)]
    return [step for group, step in steps if group in groups]


def mfu_cases(m: cases.ModelCases, groups) -> list:
    peers = ([m.peers_mean] if "hf" in groups else []) + ([m.ort_mean] if "ort" in groups else [])
    return [m.baseline_mean, *peers, lambda: m.grpc_mean(8, 8), m.forward_fast]  # 8x8 right after the peers


def run_model(shape, args, workload, contacts_workload, full: bool) -> list[cases.Measurement]:
    name = served_name(shape)
    checkpoint = checkpoint_for(shape, args.cache_dir)
    loaded = load(name, checkpoint)
    loaded.model.to(args.device)
    m = cases.ModelCases(name, loaded, checkpoint, workload, contacts_workload, args.device, args.precision,
                         tuple(shlex.split(args.server_args)))
    groups = args.cases if full else {"baseline", "forward", "grpc"}
    try:
        if groups & SERVED_GROUPS:
            m.server("fast")
        if full and "grpc" in groups:
            m.server("exact")
        steps = full_cases(m, int_list(args.clients), int_list(args.items), groups) if full else mfu_cases(m, args.cases)
        if steps or m.servers:  # the scheduler cases warm their own servers
            warm(m, workload)
        for repeat in range(args.repeats):
            log.info("%s: run %d of %d", name, repeat + 1, args.repeats)
            for step in steps:
                step()
        if full and "latency" in groups:
            m.latency(args.latency_requests)
        if m.servers:
            m.server_rss()
    finally:
        m.close()
    extra = []
    small = args.quick  # fewer requests: the smoke run checks the cases work, not their figures
    if full and "hol" in groups:
        extra.append(scheduling.head_of_line(name, checkpoint, args.device, m.server_args, args.hol_length,
                                             alone_requests=8 if small else 30))
    if full and "cache" in groups:
        extra.append(scheduling.repeats(name, checkpoint, args.device, workload, m.server_args,
                                        probes=5 if small else 20, dms_variants=8 if small else 63))
    return list(m.results.values()) + extra


def int_list(text: str) -> list[int]:
    """--clients / --items: comma-separated counts."""
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so that every case's finally stops the servers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args = parse_args(argv)
    started = time.monotonic()
    run = {
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine.describe(),
        "repeats": args.repeats,
    }
    log.info("machine: %s", run["machine"])
    if args.gpu_suite:
        from bench import gpu_suite

        gpu_suite.configure(args)  # the model list and the device, checked before any work

        def save(measurements):  # each model's results are on disk as soon as it is done
            run["wall_seconds"] = time.monotonic() - started
            run["targets"] = gpu_suite.targets(measurements)
            report.write(args.out_dir, run, measurements)

        measurements = gpu_suite.run(args, run, checkpoint_for, save)
        return _finish(args, run, measurements, started, gpu_suite.targets(measurements))
    # MFU is against the matmul rate of the precision the service computes in.
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    run["matmul_flops_per_s"] = machine.matmul_rate(args.device, dtype, n=2048 if args.device == "cpu" else 8192)
    run["matmul_precision"] = f"{args.precision} on {args.device}"
    log.info("%s matmul on %s: %.1f GFLOP/s", args.precision, args.device, run["matmul_flops_per_s"] / 1e9)

    workload = mixed_workload(args.sequences, args.seed)
    contacts_workload = workload.limited(args.contacts_max_length)
    small = mixed_workload(args.mfu_sequences, args.seed, fixed=(300,) * 8)
    run["workloads"] = [workload.describe(), contacts_workload.describe() + " (contacts cases)",
                        small.describe() + " (--mfu-models)"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_fasta(workload, args.out_dir / "workload.fasta")

    measurements: list[cases.Measurement] = []

    def checkpoint_results():  # each model's results are on disk as soon as it is done
        run["wall_seconds"] = time.monotonic() - started
        report.write(args.out_dir, run, measurements)

    for shape in shapes(args.models):
        measurements += run_model(shape, args, workload, contacts_workload, full=True)
        checkpoint_results()
        gc.collect()
    for shape in shapes(args.mfu_models) if "mfu" in args.cases else ():
        measurements += run_model(shape, args, small, small, full=False)
        checkpoint_results()
        gc.collect()
    if "depth" in args.cases:
        shape = args.depth_shape
        layer = min(6, SHAPES[shape][0] - 1)
        measurements += speedups.early_exit(served_name(shape), checkpoint_for(shape, args.cache_dir), args.device,
                                            tuple(shlex.split(args.server_args)),
                                            mixed_workload(args.depth_sequences, args.seed, fixed=()), args.repeats,
                                            layer)
        checkpoint_results()
    for shape in shapes(args.int8_models) if "int8" in args.cases else ():
        checkpoint = checkpoint_for(shape, args.cache_dir)
        measurements += speedups.int8(served_name(shape), load(served_name(shape), checkpoint), checkpoint,
                                      tuple(shlex.split(args.server_args)),
                                      mixed_workload(args.int8_sequences, args.seed, fixed=()), args.repeats,
                                      budgets=(1024,) if args.quick else cases.PEER_BUDGETS["cpu"])
        checkpoint_results()
        gc.collect()
    for shape in shapes(args.packed_models) if "packed" in args.cases else ():
        loaded = load(served_name(shape), checkpoint_for(shape, args.cache_dir))
        measurements += speedups.packed(served_name(shape), loaded, workload, args.repeats)
        checkpoint_results()
    rss_sample = Workload("8x300 + 1x2048", tuple(s for s in workload.sequences if len(s) in (300, 2048)))
    for shape in shapes(args.rss_models) if "rss" in args.cases else ():
        measurements.append(cases.server_rss_for(served_name(shape), checkpoint_for(shape, args.cache_dir), rss_sample))
    if args.contacts_memory:
        shape = args.contacts_shape
        measurements.append(cases.contacts_memory(served_name(shape), checkpoint_for(shape, args.cache_dir),
                                                  args.contacts_compare_length, args.contacts_serve_length))
    run["peer"] = report.peer(measurements)
    return _finish(args, run, measurements, started)


def _finish(args, run: dict, measurements: list, started: float, checks: list[dict] | None = None) -> int:
    """Targets (the cases' own unless `checks` are given), the report files, and the report on stdout."""
    run["wall_seconds"] = time.monotonic() - started
    run["targets"] = report.targets(measurements, run["matmul_flops_per_s"]) if checks is None else checks
    json_path, md_path = report.write(args.out_dir, run, measurements)
    print(md_path.read_text())
    log.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
