"""Scoring benchmark (issue 20): pseudo-log-likelihoods and a saturation scan, three ways.

    python -m bench.scoring_cases --models 8m                   # the issue's sizes
    python -m bench.scoring_cases --quick                       # tiny shape, small sizes: the smoke test

Cases:
- pll: the PLL of `--pll-sequences` sequences of `--pll-length` residues (one masked pass per
  position);
- scan: a 19 x `--scan-positions` saturation scan of a `--scan-length`-residue wild type,
  scored by masked marginals (one masked pass per position).

Paths, each timed end to end from sequences to scores:
- server: `esm2 score`'s library today (esm2_client.scoring), one Score RPC per request within the
  model's bounds: the server queues every masked pass of a request at once;
- client-side: what `esm2 score` did before, kept here as the peer: the client masks each position
  and sends the masked sequences as Predict requests (8 per request, 4 in flight), then computes the
  log-softmax itself from the [L, 20] logits it gets back;
- hf script: a user's transformers script, EsmForMaskedLM with SDPA, masking one position per
  sequence copy and running `batch` copies per forward pass, at the best batch size of a sweep
  (the sweep runs on a probe before the timed runs; every size is reported).

The paths run interleaved (server, client-side, hf; then client-side, hf, server; ...) so that
a loaded machine slows each alike and none always runs first; the report gives every repeat and
the median of the paired ratios (each path over the server path of the same repeat). Servers run
with `--cache-mb 0` (the repeats reuse the sequences), so only passes equal within one request
merge. All three must agree on every score (checked).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bench import machine
from bench.hf_peer import HfPeer
from bench.run import checkpoint_for, served_name, shapes
from bench.servers import Server
from bench.workload import random_sequences, single
from esm2_client import scoring
from esm2_client.client import Esm2Client
from esm2_wire.variants import masked_at, parse_variant
from esm2_wire.vocabulary import STANDARD_AMINO_ACIDS
from service.models.checkpoints import load

log = logging.getLogger("bench.scoring")
HERE = Path(__file__).resolve().parent
AMINO = "ACDEFGHIKLMNPQRSTVWY"
HF_BATCHES = (1, 4, 16, 64)
AGREEMENT = 2e-3  # largest |difference| of a score between two paths (float32 logits, sums of up to 300 terms)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.scoring_cases", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="8m", help="shapes (random weights), e.g. 8m,35m")
    p.add_argument("--pll-sequences", type=int, default=10)
    p.add_argument("--pll-length", type=int, default=300)
    p.add_argument("--scan-length", type=int, default=300, help="residues of the scan's wild type")
    p.add_argument("--scan-positions", type=int, default=50, help="positions scanned (19 substitutions each)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hf-batches", default=",".join(map(str, HF_BATCHES)), help="batch sizes the hf sweep tries")
    p.add_argument("--hf-probe-positions", type=int, default=64, help="masked passes the hf sweep times per size")
    p.add_argument("--quick", action="store_true", help="tiny shape, 3 x 40 residues, 19 x 8 scan, one repeat")
    p.add_argument("--report", type=Path, metavar="JSON", help="only rewrite the tables of a finished run's JSON")
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.report:
        return args
    if args.quick:
        args.models, args.pll_sequences, args.pll_length = "tiny", 3, 40
        args.scan_length, args.scan_positions, args.repeats, args.hf_batches = 40, 8, 1, "1,8"
        args.hf_probe_positions = 16
    args.hf_batches = [int(b) for b in args.hf_batches.split(",") if b.strip()]
    return args


def saturation(wild_type: str, positions: int) -> list[str]:
    """Every substitution at the first `positions` positions: 19 per position."""
    return [f"{a}{p}{b}" for p, a in enumerate(wild_type[:positions], 1) for b in AMINO if b != a]


# ---- the client-side path (esm2 score before issue 20) -------------------------------------
def _client_side_rows(client: Esm2Client, model: str, sequence: str, positions: list[int]):
    """(position -> log-softmax there with it alone masked, token -> column), from Predict."""
    outputs = client.predict(model, [masked_at(sequence, p) for p in positions])
    rows = {}
    for position, output in zip(positions, outputs):
        logits = output.logits[position - 1].astype(np.float64)
        shifted = logits - logits.max()
        rows[position] = shifted - np.log(np.exp(shifted).sum())
    return rows, {token: i for i, token in enumerate(outputs[0].vocab_tokens)}


def client_side_scan(client: Esm2Client, model: str, sequence: str, variants: list[str]) -> list[float]:
    parsed = [parse_variant(v, sequence) for v in variants]
    rows, col = _client_side_rows(client, model, sequence, sorted({m.position for v in parsed for m in v}))
    return [float(sum(rows[m.position][col[m.mutant]] - rows[m.position][col[m.wild_type]] for m in v))
            for v in parsed]


def client_side_pll(client: Esm2Client, model: str, sequences: list[str]) -> list[float]:
    out = []
    for sequence in sequences:
        positions = [i for i, a in enumerate(sequence, 1) if a in STANDARD_AMINO_ACIDS]
        rows, col = _client_side_rows(client, model, sequence, positions)
        out.append(float(sum(rows[p][col[sequence[p - 1]]] for p in positions)))
    return out


# ---- the user's transformers script ------------------------------------------------------------
class HfScript:
    """EsmForMaskedLM: for each position to score, a copy of the sequence with it masked; `batch`
    copies per forward pass; log-softmax over the 20 standard amino acids at the masked position."""

    def __init__(self, loaded):
        self.peer = HfPeer(loaded)
        self.tokenizer = self.peer.tokenizer
        self.columns = [self.tokenizer.convert_tokens_to_ids(a) for a in AMINO]

    @torch.inference_mode()
    def masked_log_probs(self, sequence: str, positions: list[int], batch: int) -> dict[int, np.ndarray]:
        ids = self.tokenizer(sequence, return_tensors="pt")["input_ids"][0]
        out = {}
        for start in range(0, len(positions), batch):
            chunk = positions[start : start + batch]
            tokens = ids.repeat(len(chunk), 1)
            for row, position in enumerate(chunk):
                tokens[row, position] = self.tokenizer.mask_token_id  # position 1-based = index after <cls>
            logits = self.peer.mlm(input_ids=tokens).logits
            for row, position in enumerate(chunk):
                out[position] = torch.log_softmax(logits[row, position, self.columns].double(), -1).numpy()
        return out

    def pll(self, sequences: list[str], batch: int) -> list[float]:
        col = {a: i for i, a in enumerate(AMINO)}
        out = []
        for sequence in sequences:
            positions = [i for i, a in enumerate(sequence, 1) if a in col]
            rows = self.masked_log_probs(sequence, positions, batch)
            out.append(float(sum(rows[p][col[sequence[p - 1]]] for p in positions)))
        return out

    def scan(self, sequence: str, variants: list[str], batch: int) -> list[float]:
        col = {a: i for i, a in enumerate(AMINO)}
        parsed = [parse_variant(v, sequence) for v in variants]
        rows = self.masked_log_probs(sequence, sorted({m.position for v in parsed for m in v}), batch)
        return [float(sum(rows[m.position][col[m.mutant]] - rows[m.position][col[m.wild_type]] for m in v))
                for v in parsed]


def best_batch(script: HfScript, sequence: str, batches: list[int], probe: int) -> tuple[int, dict[int, float]]:
    """Seconds per masked pass at each batch size on a probe of `probe` positions; the fastest size."""
    positions = list(range(1, min(probe, len(sequence)) + 1))
    script.masked_log_probs(sequence, positions[:4], 4)  # warm
    per_pass = {}
    for batch in batches:
        start = time.perf_counter()
        script.masked_log_probs(sequence, positions, batch)
        per_pass[batch] = (time.perf_counter() - start) / len(positions)
    return min(per_pass, key=per_pass.get), per_pass


# ---- one model ------------------------------------------------------------------------------------
def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _agree(name: str, reference: list[float], other: list[float]) -> float:
    worst = float(np.max(np.abs(np.asarray(reference) - np.asarray(other))))
    if worst > AGREEMENT:
        raise RuntimeError(f"{name} disagrees with the server path by {worst:.2e}")
    return worst


def run_model(shape: str, args) -> dict:
    name = served_name(shape)
    checkpoint = checkpoint_for(shape, args.cache_dir)
    rng = np.random.default_rng(20)
    library = random_sequences([args.pll_length] * args.pll_sequences, rng)
    wild_type = single(args.scan_length, seed=21)
    variants = saturation(wild_type, args.scan_positions)
    script = HfScript(load(name, checkpoint))
    batch, sweep = best_batch(script, library[0], args.hf_batches, args.hf_probe_positions)
    log.info("%s: hf batch sweep (s per pass) %s; best %d", name, sweep, batch)
    times: dict[str, dict[str, list[float]]] = {case: {} for case in ("pll", "scan")}
    differences: dict[str, float] = {}
    with Server(name, checkpoint, "--cache-mb", "0") as server, Esm2Client(server.target) as client:
        paths = {
            "pll": {"server": lambda: [r.pseudo_log_likelihood for r in
                                       scoring.pseudo_log_likelihoods(client, name, library)],
                    "client-side": lambda: client_side_pll(client, name, library),
                    "hf script": lambda: script.pll(library, batch)},
            "scan": {"server": lambda: scoring.masked_marginal_scores(client, name, wild_type, variants),
                     "client-side": lambda: client_side_scan(client, name, wild_type, variants),
                     "hf script": lambda: script.scan(wild_type, variants, batch)},
        }
        # warm the server (two batches of full-length passes) and both client paths
        scoring.masked_marginal_scores(client, name, wild_type, variants[: 19 * 6])
        client_side_scan(client, name, wild_type, variants[: 19 * 6])
        for repeat in range(args.repeats):
            for case, runs in paths.items():
                values = {}
                order = list(runs)
                for path in order[repeat % 3:] + order[: repeat % 3]:  # no path always first
                    seconds, values[path] = _timed(runs[path])
                    times[case].setdefault(path, []).append(seconds)
                    log.info("%s %s run %d: %s %.2f s", name, case, repeat + 1, path, seconds)
                for path in ("client-side", "hf script"):
                    differences[f"{case}: {path}"] = max(differences.get(f"{case}: {path}", 0.0),
                                                         _agree(f"{case} {path}", values["server"], values[path]))
    medians = {case: {path: statistics.median(s) for path, s in paths_.items()} for case, paths_ in times.items()}
    return {
        "model": name, "times": times, "median_s": medians, "hf_batch": batch, "hf_sweep_s_per_pass": sweep,
        "max_abs_difference_vs_server": differences,
        "paired_ratios": {case: paired_ratios(t) for case, t in times.items()},
        "pll": f"{args.pll_sequences} x {args.pll_length} residues, {args.pll_sequences * args.pll_length} passes",
        "scan": f"19 x {args.scan_positions} positions of a {args.scan_length}-residue wild type "
                f"({len(variants)} variants, {args.scan_positions} passes)",
    }


def markdown(run: dict) -> str:
    """Per repeat: each path's seconds and its ratio to the server path in the same repeat (the
    paths of one repeat ran back to back); then the median of those paired ratios."""
    lines = [f"Run {run['started']} ({run['wall_seconds']:.0f} s), command: `{run['command']}`",
             f"Machine: {run['machine']}", "",
             "| model | case | repeat | server s | client-side s | hf script s (batch) | client-side / server "
             "| hf script / server |", "|---|---|---|---|---|---|---|---|"]
    for result in run["results"]:
        for case in ("pll", "scan"):
            t = result["times"][case]
            for repeat in range(len(t["server"])):
                server = t["server"][repeat]
                lines.append(f"| {result['model']} | {case}: {result[case]} | {repeat + 1} | {server:.2f} "
                             f"| {t['client-side'][repeat]:.2f} | {t['hf script'][repeat]:.2f} ({result['hf_batch']}) "
                             f"| {t['client-side'][repeat] / server:.2f}x | {t['hf script'][repeat] / server:.2f}x |")
            r = result["paired_ratios"][case]
            lines.append(f"| {result['model']} | {case} | median of paired ratios | | | | {r['client-side']:.2f}x "
                         f"| {r['hf script']:.2f}x |")
    lines += ["", "hf batch sweep, seconds per masked pass: "
              + "; ".join(f"{r['model']}: " + ", ".join(f"{b}: {s:.4f}" for b, s in r["hf_sweep_s_per_pass"].items())
                          for r in run["results"]),
              "Largest score difference from the server path: "
              + "; ".join(f"{r['model']} {k} {v:.1e}" for r in run["results"]
                          for k, v in r["max_abs_difference_vs_server"].items())]
    return "\n".join(lines) + "\n"


def paired_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over repeats of each path's seconds over the server path's in the same repeat."""
    return {path: statistics.median(s / server for s, server in zip(seconds, times["server"]))
            for path, seconds in times.items()}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.report:
        run = json.loads(args.report.read_text())
        for result in run["results"]:
            result["paired_ratios"] = {case: paired_ratios(t) for case, t in result["times"].items()}
        print(markdown(run))
        return 0
    started = time.monotonic()
    run = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": shlex.join(["python", "-m", "bench.scoring_cases", *(sys.argv[1:] if argv is None else argv)]),
           "machine": machine.describe(), "repeats": args.repeats}
    run["results"] = [run_model(shape, args) for shape in shapes(args.models)]
    run["wall_seconds"] = time.monotonic() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "scoring-" + run["started"].replace(":", "").replace("-", "")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(run, indent=1))
    text = markdown(run)
    (args.out_dir / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
