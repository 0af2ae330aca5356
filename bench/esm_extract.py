"""fair-esm's `esm-extract`, for where its script is missing (the fair-esm 2.0.0 wheel ships none).

    python -m bench.esm_extract MODEL.pt FASTA OUT_DIR --include mean per_tok bos contacts \
        [--repr_layers -1 0] [--truncation_seq_length 1022] [--toks_per_batch 4096] [--nogpu]

Same command line, pipeline and output as upstream's scripts/extract.py: fair-esm's
FastaBatchedDataset, its token-budget batches (extra_toks_per_seq=1) fed through a DataLoader with
2 workers and the truncating batch converter, fair-esm's stock `model(...)` forward, and one
`<label>.pt` per sequence holding `label` plus, as asked, `representations` (per token, rows
1..n), `mean_representations`, `bos_representations` (row 0) and `contacts` ([:n, :n]), keyed by
layer, with n = min(truncation, length). Labels already written are skipped, as upstream does.
The one difference: the checkpoint goes through service.models.checkpoints.load (torch's weights_only
unpickler) instead of fair-esm's unrestricted torch.load.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import esm
import torch

from service.models.checkpoints import load


def command() -> list[str]:
    """fair-esm's esm-extract where installed, else this module (the same pipeline)."""
    script = shutil.which("esm-extract") or shutil.which("esm-extract", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "bench.esm_extract"]

OUTPUTS = ("mean", "per_tok", "bos", "contacts")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.esm_extract", description=__doc__.splitlines()[0])
    p.add_argument("model_location", type=Path, help="fair-esm ESM-2 checkpoint file (.pt)")
    p.add_argument("fasta_file", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--toks_per_batch", type=int, default=4096)
    p.add_argument("--repr_layers", type=int, nargs="+", default=[-1], help="0 = embeddings, -1 = last")
    p.add_argument("--include", nargs="+", choices=OUTPUTS, required=True)
    p.add_argument("--truncation_seq_length", type=int, default=1022)
    p.add_argument("--nogpu", action="store_true")
    return p.parse_args(argv)


def one_result(label: str, length: int, i: int, representations: dict, contacts, include) -> dict:
    """Row i of a batch's outputs, sliced and copied (a view would pickle the whole batch)."""
    result = {"label": label}
    if "per_tok" in include:
        result["representations"] = {k: v[i, 1 : length + 1].clone() for k, v in representations.items()}
    if "mean" in include:
        result["mean_representations"] = {k: v[i, 1 : length + 1].mean(0).clone() for k, v in representations.items()}
    if "bos" in include:
        result["bos_representations"] = {k: v[i, 0].clone() for k, v in representations.items()}
    if contacts is not None:
        result["contacts"] = contacts[i, :length, :length].clone()
    return result


def extract(args: argparse.Namespace) -> None:
    loaded = load(args.model_location.stem, args.model_location)
    model, alphabet = loaded.model, loaded.alphabet
    device = torch.device("cuda" if torch.cuda.is_available() and not args.nogpu else "cpu")
    model.to(device)
    layers = model.num_layers + 1
    if not all(-layers <= i < layers for i in args.repr_layers):
        raise SystemExit(f"--repr_layers must lie in [-{layers}, {layers - 1}]")
    repr_layers = [i % layers for i in args.repr_layers]
    return_contacts = "contacts" in args.include

    dataset = esm.FastaBatchedDataset.from_file(args.fasta_file)
    batches = dataset.get_batch_indices(args.toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=2,
                                         collate_fn=alphabet.get_batch_converter(args.truncation_seq_length))
    print(f"Read {args.fasta_file} with {len(dataset)} sequences")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    with torch.no_grad():
        for number, (labels, strs, tokens) in enumerate(loader, 1):
            print(f"Processing {number} of {len(batches)} batches ({tokens.size(0)} sequences)")
            todo = [i for i, label in enumerate(labels) if not (args.output_dir / f"{label}.pt").exists()]
            if not todo:
                continue
            out = model(tokens.to(device), repr_layers=repr_layers, return_contacts=return_contacts)
            representations = {k: v.cpu() for k, v in out["representations"].items()}
            contacts = out["contacts"].cpu() if return_contacts else None
            for i in todo:
                path = args.output_dir / f"{labels[i]}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)  # labels may hold '/'
                length = min(args.truncation_seq_length, len(strs[i]))
                torch.save(one_result(labels[i], length, i, representations, contacts, args.include), path)


if __name__ == "__main__":
    extract(parse_args())
