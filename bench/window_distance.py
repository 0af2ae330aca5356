"""How far each stitching rule of windowed mode sits from one full-length pass (issue 29).

For proteins that still fit in one pass (1,500-2,048 residues), compare the full-length
fair-esm outputs with windows of 1,022 residues at the default stride (511), stitched by
each rule of service.api.windows. Random-weight checkpoints in the real shapes (pretrained
weights cannot be downloaded here), so the figures say how each rule treats the cuts, not
what a trained model's embeddings would do.

    python -m bench.window_distance [--shape 8m] [--proteins 4]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from service.api.windows import DEFAULT_LENGTH, RULES, Cover, Window
from service.models.checkpoints import load
from service.models.random_checkpoints import SHAPES, write_random_checkpoint

AMINO = "ACDEFGHIKLMNPQRSTVWY"
STANDARD_ORDER = "LAGVSERTIDPKQNFYMHWC"


def _outputs(loaded, sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """Last layer's per-token rows and the 20 standard logits, residues only, fair-esm alone."""
    model, alphabet = loaded.model, loaded.alphabet
    _, _, tokens = alphabet.get_batch_converter()([("x", sequence)])
    with torch.no_grad():
        out = model(tokens, repr_layers=[model.num_layers])
    columns = [alphabet.get_idx(a) for a in STANDARD_ORDER]
    return (out["representations"][model.num_layers][0, 1:-1].numpy(),
            out["logits"][0, 1:-1][:, columns].numpy())


def _relative(stitched: np.ndarray, full: np.ndarray) -> float:
    return float(np.linalg.norm(stitched - full) / np.linalg.norm(full))


def measure(shape: str, proteins: int, seed: int = 0) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as directory:
        path = write_random_checkpoint(shape, Path(directory), seed=seed)
        loaded = load(f"esm2-{shape}", path)
    rng = random.Random(seed)
    window = Window(DEFAULT_LENGTH, DEFAULT_LENGTH // 2)
    found = {rule: {"per_token": [], "logits": [], "cosine": []} for rule in RULES}
    for number in range(proteins):
        length = 1500 + number * (548 // max(1, proteins - 1))
        sequence = "".join(rng.choice(AMINO) for _ in range(length))
        full_rows, full_logits = _outputs(loaded, sequence)
        spans = Cover.of(length, window).spans
        parts = [_outputs(loaded, sequence[s.start:s.stop]) for s in spans]
        for rule in RULES:
            cover = Cover(length, spans, rule)
            rows = cover.stitch([p[0] for p in parts])
            logits = cover.stitch([p[1] for p in parts])
            cosine = (rows * full_rows).sum(1) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(full_rows, axis=1))
            found[rule]["per_token"].append(_relative(rows, full_rows))
            found[rule]["logits"].append(_relative(logits, full_logits))
            found[rule]["cosine"].append(float(cosine.mean()))
    return {rule: {k: float(np.mean(v)) for k, v in values.items()} for rule, values in found.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--proteins", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print("| shape | rule | per_token rel. L2 | logits rel. L2 | mean cosine |")
    print("|---|---|---|---|---|")
    for shape in args.shape or ["8m"]:
        for rule, figures in measure(shape, args.proteins).items():
            print(f"| {shape} | {rule} | {figures['per_token']:.4f} | {figures['logits']:.4f} | {figures['cosine']:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
