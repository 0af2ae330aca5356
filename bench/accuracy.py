"""How far `--precision bf16`, fp16 or int8 is from fp32, on the benchmark workload.

    python -m bench.accuracy --models 8m,35m [--precision bf16] [--sequences 24]
    python -m bench.accuracy --models 8m,35m,150m --precision int8 --markdown

Runs the service's own forward (service.models.forward) one sequence at a time, in fp32 and in
the other precision (under autocast, or over the int8-quantized layers), and reports, for every
output kind: the largest |difference| of last-layer per-residue embeddings (absolute, and
relative to the largest fp32 value), the cosine (worst sequence) and largest relative error of
the mean and BOS embeddings, top-1 agreement of the logits over all residues, the top-L contact
precision against fp32's top-L (pairs at least 6 apart, per sequence of length L, mean over
sequences) and the largest |difference| of the contact probabilities. With random weights the contact map is nearly flat, so its top-L ranking
is decided by differences below bf16's resolution: read that figure with the max difference. The arithmetic does not depend on
whether the CPU has native bf16 instructions (those only make it fast), so this runs anywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import numpy as np
import torch

from bench.run import checkpoint_for, shapes
from bench.workload import mixed_workload
from esm2_wire.output_kinds import OutputKind
from service.models.checkpoints import load
from service.models.forward import BatchPlan, forward
from service.models.precision import AUTOCAST_DTYPES
from service.models.quantize import quantize_layers

MIN_SEPARATION = 6  # contacts closer than this along the chain are trivially predicted


def _outputs(loaded, model, sequence: str, autocast: torch.dtype | None, contacts: bool) -> dict[str, np.ndarray]:
    _, _, tokens = loaded.alphabet.get_batch_converter()([("x", sequence)])
    out = {}
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        fast = forward(model, tokens, BatchPlan(layers=frozenset({loaded.num_layers}), outputs=frozenset({OutputKind.LOGITS})))
        if contacts:
            maps = forward(model, tokens, BatchPlan(outputs=frozenset({OutputKind.CONTACTS}), fast_attention=False))
            out["contacts"] = maps.contacts[0].float().numpy()
    n = len(sequence)
    rep = fast.representations[loaded.num_layers][0].float().numpy()
    out["per_token"], out["bos"] = rep[1 : n + 1], rep[0]
    out["logits"] = fast.logits[0, 1 : n + 1].float().numpy()
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _relative(low: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(low - ref) / np.linalg.norm(ref))


def _top_pairs(contacts: np.ndarray, count: int) -> set[tuple[int, int]]:
    i, j = np.triu_indices(contacts.shape[0], k=MIN_SEPARATION)
    order = np.argsort(-contacts[i, j], kind="stable")[:count]
    return set(zip(i[order].tolist(), j[order].tolist()))


def compare(loaded, sequences, precision: str, contacts_max_length: int = 512) -> dict:
    autocast = AUTOCAST_DTYPES[precision]
    low_model = quantize_layers(copy.deepcopy(loaded.model)) if precision == "int8" else loaded.model
    max_abs = max_ref = 0.0
    cosines, agree, residues, contact_agreement, contact_diff = [], 0, 0, [], 0.0
    bos_cosines, mean_rel, bos_rel, token_rel = [], [], [], []
    for sequence in sequences:
        with_contacts = len(sequence) <= contacts_max_length
        ref = _outputs(loaded, loaded.model, sequence, None, with_contacts)
        low = _outputs(loaded, low_model, sequence, autocast, with_contacts)
        max_abs = max(max_abs, float(np.abs(low["per_token"] - ref["per_token"]).max()))
        max_ref = max(max_ref, float(np.abs(ref["per_token"]).max()))
        a, b = ref["per_token"].mean(0), low["per_token"].mean(0)
        cosines.append(_cosine(a, b))
        mean_rel.append(_relative(b, a))
        bos_cosines.append(_cosine(ref["bos"], low["bos"]))
        bos_rel.append(_relative(low["bos"], ref["bos"]))
        token_rel.append(_relative(low["per_token"], ref["per_token"]))
        agree += int((ref["logits"].argmax(-1) == low["logits"].argmax(-1)).sum())
        residues += len(sequence)
        if with_contacts:
            L = len(sequence)
            contact_diff = max(contact_diff, float(np.abs(ref["contacts"] - low["contacts"]).max()))
            contact_agreement.append(len(_top_pairs(ref["contacts"], L) & _top_pairs(low["contacts"], L)) / L)
    return {"model": loaded.name, "precision": precision, "sequences": len(sequences), "residues": residues,
            "embeddings_max_abs_diff": max_abs, "embeddings_max_abs_fp32": max_ref,
            "embeddings_max_rel_diff": max_abs / max_ref, "mean_embedding_cosine_min": min(cosines),
            "mean_embedding_rel_error_max": max(mean_rel), "bos_embedding_cosine_min": min(bos_cosines),
            "bos_embedding_rel_error_max": max(bos_rel), "per_token_rel_error_max": max(token_rel),
            "logits_top1_agreement": agree / residues,
            "contacts_topL_agreement": float(np.mean(contact_agreement)) if contact_agreement else None,
            "contacts_max_abs_diff": contact_diff, "contacts_sequences": len(contact_agreement)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="8m,35m")
    p.add_argument("--precision", choices=("bf16", "fp16", "int8"), default="bf16")
    p.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    p.add_argument("--sequences", type=int, default=24, help="log-normal sequences (plus the fixed ones)")
    p.add_argument("--max-length", type=int, default=2048, help="leave out longer sequences (time)")
    p.add_argument("--contacts-max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="bench/.cache")
    args = p.parse_args(argv)
    from pathlib import Path

    workload = mixed_workload(args.sequences, args.seed).limited(args.max_length)
    print(workload.describe(), file=sys.stderr)
    results = []
    for shape in shapes(args.models):
        loaded = load(f"esm2-{shape}", checkpoint_for(shape, Path(args.cache_dir)))
        results.append(compare(loaded, workload.sequences, args.precision, args.contacts_max_length))
        print(json.dumps(results[-1]), flush=True)
    if args.markdown:
        print("\n".join(markdown(results)))
    return 0


def markdown(results: list[dict]) -> list[str]:
    """Each model's figures against fp32 as a table row (the source of BENCHMARKS.md's tables)."""
    lines = ["| model | precision | mean: worst cosine / worst rel. error | BOS: worst cosine / worst rel. error "
             "| per-token: worst rel. error / max abs diff (of max abs) | logits top-1 agreement "
             "| contacts top-L precision vs fp32 / max abs diff |", "|---|---|---|---|---|---|---|"]
    for r in results:
        contacts = r["contacts_topL_agreement"]
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['mean_embedding_cosine_min']:.5f} / {r['mean_embedding_rel_error_max']:.4f} "
            f"| {r['bos_embedding_cosine_min']:.5f} / {r['bos_embedding_rel_error_max']:.4f} "
            f"| {r['per_token_rel_error_max']:.4f} / {r['embeddings_max_abs_diff']:.3f} ({r['embeddings_max_abs_fp32']:.1f}) "
            f"| {r['logits_top1_agreement']:.1%} "
            f"| {'-' if contacts is None else format(contacts, '.1%')} / {r['contacts_max_abs_diff']:.1e} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
