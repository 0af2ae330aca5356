"""Windowed mode against a hand-chunked Hugging Face loop (issue 29): residues/s of mean
embeddings for proteins longer than the model's context.

Two workloads: one titin-length protein (35,000 residues), and a mix with a long tail
(log-normal lengths, a few proteins past 2,048 and one past 10,000). The service gets them
with `params.window` (1,022 residues every 511) through the client, several requests in
flight; the peer is what a user writes today: for each protein, cut the same windows, run
them through transformers' EsmModel with SDPA attention in token-budget batches, average each
position over its windows, take the mean. Both compute the same function on the benchmark's
random 8M-shape checkpoint; the first protein's means are compared before timing.

    python -m bench.windowed [--shape 8m] [--out bench/results/windowed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import machine
from bench.hf_peer import HfPeer
from bench.servers import Server
from esm2_client import Esm2Client
from esm2_wire.windows import window_starts
from service.models.checkpoints import load
from service.models.random_checkpoints import write_random_checkpoint

AMINO = "ACDEFGHIKLMNPQRSTVWY"
LENGTH, STRIDE = 1022, 511
PEER_BATCH_TOKENS = 4096  # padded tokens per HF batch: four windows


def workloads(seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)

    def protein(n: int) -> str:
        return "".join(rng.choice(AMINO) for _ in range(n))
    lengths = sorted(min(12_000, max(50, int(rng.lognormvariate(6.2, 0.9)))) for _ in range(40))
    lengths[-1] = 12_000  # the tail: one past 10,000
    return {"titin (35,000)": [protein(35_000)], "long-tail mix (40)": [protein(n) for n in lengths]}


def peer_means(peer: HfPeer, sequences: list[str]) -> list[np.ndarray]:
    """The hand-chunked loop: per protein, its windows in token-budget batches, rows averaged."""
    out = []
    with torch.inference_mode():
        for sequence in sequences:
            length = min(LENGTH, len(sequence))
            starts = window_starts(len(sequence), length, STRIDE)
            total = torch.zeros(len(sequence), peer.embedder.config.hidden_size, dtype=torch.float64)
            count = torch.zeros(len(sequence), 1, dtype=torch.float64)
            per_batch = max(1, PEER_BATCH_TOKENS // (length + 2))
            for first in range(0, len(starts), per_batch):
                chunk = starts[first:first + per_batch]
                encoded = peer.tokenizer([sequence[s:s + length] for s in chunk], return_tensors="pt")
                rows = peer.embedder(**encoded).last_hidden_state[:, 1:-1].double()
                for s, window_rows in zip(chunk, rows):
                    total[s:s + length] += window_rows
                    count[s:s + length] += 1
            out.append((total / count).mean(0).float().numpy())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8m")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--max-in-flight", type=int, default=4)
    args = parser.parse_args(argv)
    report = {"machine": machine.describe(), "window": [LENGTH, STRIDE], "results": []}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = write_random_checkpoint(args.shape, Path(directory), seed=3)
        loaded = load(f"esm2-{args.shape}", checkpoint)
        peer = HfPeer(loaded)
        server = Server("esm2-bench", checkpoint, "--max-windowed-residues", "40000", "--cache-mb", "0")
        try:
            with Esm2Client(server.target, max_in_flight=args.max_in_flight) as client:
                for name, sequences in workloads().items():
                    residues = sum(map(len, sequences))
                    check = peer_means(peer, sequences[:1])[0]
                    mine = client.encode("esm2-bench", sequences[:1], window=(LENGTH, STRIDE))[0]
                    difference = float(np.abs(mine.mean[loaded.num_layers] - check).max())
                    start = time.perf_counter()
                    client.encode("esm2-bench", sequences, window=(LENGTH, STRIDE), timeout=3600)
                    service_s = time.perf_counter() - start
                    start = time.perf_counter()
                    peer_means(peer, sequences)
                    peer_s = time.perf_counter() - start
                    row = {"workload": name, "proteins": len(sequences), "residues": residues,
                           "windows": sum(len(window_starts(len(s), min(LENGTH, len(s)), STRIDE)) for s in sequences),
                           "service_residues_per_s": residues / service_s, "hf_sdpa_residues_per_s": residues / peer_s,
                           "speedup": peer_s / service_s, "max_abs_diff_mean": difference,
                           "load_average_after": os.getloadavg()}
                    report["results"].append(row)
                    print(json.dumps(row), flush=True)
        finally:
            server.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
