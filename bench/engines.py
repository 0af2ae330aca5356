"""The CPU engine, chosen by measurement: each candidate runs the same function over the same mix.

    python -m bench.engines --models 8m,35m,150m [--budget 1024] [--rounds 3]

Candidates, each in-process over the benchmark's log-normal mix, mean of the last layer, fp32:
- torch eager, packed: the service's default CPU forward (service.models.packed);
- torch eager, padded: the service's `--layout padded` forward (service.models.forward);
- torch.compile: the padded forward compiled by inductor with dynamic shapes (the packed forward
  loops over its sequences in Python, which inductor would recompile per batch);
- ONNX Runtime: the HF EsmModel exported to ONNX (bench/ort_peer.py) on ORT's CPU provider. The
  service's own forward does not export as one graph: it branches on whether a batch has padding
  and on which layers were asked for, and it yields between layers to interleave batches.

Rounds alternate the candidates and the table shows each one's median, its ratio to the default
from back-to-back pairs, its one-off start-up cost (compile or export) and its largest difference
from stock fair-esm on four of the sequences. The machine's CPU flags and any instruction-set caps
(bench/machine.py: ISA_CAPS) head the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import machine
from bench.baseline import max_abs_diff, service_forward_pass, service_packed_pass, stock_last_layer_rows
from bench.run import checkpoint_for, shapes
from bench.workload import mixed_workload
from service.models.checkpoints import load
from service.models.forward import BatchPlan, forward
from service.models.packed import pack, packed_forward

DEFAULT = "torch eager, packed (default)"


def _padded_rows(run, loaded, sequences) -> list[torch.Tensor]:
    """`run(tokens) -> [B, T, E]` over one padded batch of `sequences`: each one's residue rows."""
    with torch.inference_mode():  # tokens made here too: the compiled graph is guarded on inference tensors
        _, _, tokens = loaded.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
        reps = run(tokens)
    return [reps[i, 1 : len(s) + 1] for i, s in enumerate(sequences)]


def _packed_rows(loaded, sequences) -> list[torch.Tensor]:
    """The service's packed forward over `sequences` in one packed batch: each one's residue rows."""
    plan = BatchPlan(layers=frozenset({loaded.num_layers}))
    tokens, cu_seqlens = pack([torch.tensor(loaded.tokenize(tuple(s)), dtype=torch.int64) for s in sequences])
    reps = packed_forward(loaded.model, tokens, cu_seqlens, plan).representations[loaded.num_layers]
    cu = cu_seqlens.tolist()
    return [reps[begin + 1 : end - 1] for begin, end in zip(cu[:-1], cu[1:])]


class Compiled:
    """The service's padded fast forward under torch.compile (inductor, dynamic shapes)."""

    def __init__(self, loaded, sample):
        self.loaded = loaded
        self.plan = BatchPlan(layers=frozenset({loaded.num_layers}), fast_attention=True)
        # The forward branches on whether a batch has padding and on its layers: each branch is a
        # graph of its own, and none may fall back to eager for running out of recompiles.
        torch._dynamo.config.recompile_limit = 64
        self.run = torch.compile(lambda tokens: forward(loaded.model, tokens, self.plan)
                                 .representations[loaded.num_layers], dynamic=True)
        start = time.perf_counter()
        self.mean_pass(sample)  # compiles, for each kind of batch the mix has (with and without padding)
        self.startup_s = time.perf_counter() - start

    def mean_pass(self, sequences, budget: int = 1024) -> float:
        # Tokens made under inference mode too: the compiled graph is guarded on inference tensors.
        with torch.inference_mode():
            return service_forward_pass(self.loaded, sequences, True, budget, last_layer=self.run)


def candidates(loaded, sequences, budget: int) -> tuple[dict, dict, dict]:
    """name -> timed pass; name -> start-up seconds; name -> max |candidate - stock| of the last layer."""
    from bench.hf_peer import HfPeer
    from bench.ort_peer import OrtPeer

    check = sequences[:4]
    reference = stock_last_layer_rows(loaded, check)
    plan = BatchPlan(layers=frozenset({loaded.num_layers}), fast_attention=True)
    runs = {DEFAULT: lambda: service_packed_pass(loaded, sequences, budget),
            "torch eager, padded": lambda: service_forward_pass(loaded, sequences, True, budget)}
    startup = {DEFAULT: 0.0, "torch eager, padded": 0.0}
    eager_rows = _padded_rows(lambda t: forward(loaded.model, t, plan).representations[loaded.num_layers],
                              loaded, check)
    parity = {DEFAULT: max_abs_diff(_packed_rows(loaded, check), reference),
              "torch eager, padded": max_abs_diff(eager_rows, reference)}

    compiled = Compiled(loaded, sequences)
    runs["torch.compile (inductor, dynamic)"] = lambda: compiled.mean_pass(sequences, budget)
    startup["torch.compile (inductor, dynamic)"] = compiled.startup_s
    parity["torch.compile (inductor, dynamic)"] = max_abs_diff(_padded_rows(compiled.run, loaded, check), reference)

    start = time.perf_counter()
    ort = OrtPeer(HfPeer(loaded))
    startup["ONNX Runtime (HF export)"] = time.perf_counter() - start
    runs["ONNX Runtime (HF export)"] = lambda: ort.mean_pass(sequences, budget)
    parity["ONNX Runtime (HF export)"] = ort.parity(loaded, check)["max_abs_diff_representations"]
    return runs, startup, parity


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="8m,35m,150m")
    p.add_argument("--sequences", type=int, default=24, help="log-normal sequences (plus the fixed ones)")
    p.add_argument("--budget", type=int, default=1024, help="tokens per batch, for every candidate")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each candidate, alternating")
    p.add_argument("--cache-dir", type=Path, default=Path("bench/.cache"))
    args = p.parse_args(argv)
    workload = mixed_workload(args.sequences, 0)
    print(machine.headline())
    print(f"{workload.describe()}; {args.budget}-token batches; median of {args.rounds} alternating rounds\n")
    print("| model | engine | residues/s | / default, median of pairs (min-max) | start-up s | max abs diff vs stock |")
    print("|---|---|---|---|---|---|")
    for shape in shapes(args.models):
        loaded = load(f"esm2-{shape}", checkpoint_for(shape, args.cache_dir))
        runs, startup, parity = candidates(loaded, workload.sequences, args.budget)
        for run in runs.values():  # warm: allocator, thread pools, the compiled kernels
            run()
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                seconds[name].append(run())
        for name, values in seconds.items():
            pairs = [d / s for d, s in zip(seconds[DEFAULT], values)]
            print(f"| esm2-{shape} | {name} | {workload.residues / statistics.median(values):,.0f} "
                  f"| {statistics.median(pairs):.2f} ({min(pairs):.2f}-{max(pairs):.2f}) | {startup[name]:.1f} "
                  f"| {parity[name]:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
