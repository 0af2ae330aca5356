"""The baseline: stock fair-esm in-process, batched the way fair-esm's `esm-extract` batches.

esm-extract (scripts/extract.py) sorts sequences by length, cuts them into batches under a
token budget (`FastaBatchedDataset.get_batch_indices(toks_per_batch=4096, extra_toks_per_seq=1)`),
tokenizes with the alphabet's batch converter, calls `model(tokens, repr_layers, return_contacts)`
and slices/clones each item's outputs. We do the same, minus writing files, and without its
1022-residue truncation so that both sides compute the same residues.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from esm.data import FastaBatchedDataset

from service.models.forward import BatchPlan, forward

TOKS_PER_BATCH = 4096  # esm-extract's default


def extract_batches(sequences, toks_per_batch: int = TOKS_PER_BATCH) -> list[list[int]]:
    dataset = FastaBatchedDataset([str(i) for i in range(len(sequences))], list(sequences))
    return dataset.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)


def _batches(alphabet, sequences, toks_per_batch, device):
    convert = alphabet.get_batch_converter()
    for indices in extract_batches(sequences, toks_per_batch):
        _, strs, tokens = convert([(str(i), sequences[i]) for i in indices])
        yield strs, tokens.to(device, non_blocking=True)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def stock_pass(loaded, sequences, contacts: bool = False, toks_per_batch: int = TOKS_PER_BATCH) -> float:
    """Seconds for stock fair-esm over all sequences: mean of the last layer (plus contacts)."""
    model, last, device = loaded.model, loaded.num_layers, _device(loaded.model)
    start = time.perf_counter()
    for strs, tokens in _batches(loaded.alphabet, sequences, toks_per_batch, device):
        out = model(tokens, repr_layers=[last], return_contacts=contacts)
        reps = out["representations"][last].cpu()  # esm-extract's .to(device="cpu")
        for i, s in enumerate(strs):
            reps[i, 1 : len(s) + 1].mean(0).clone()
            if contacts:
                out["contacts"][i, : len(s), : len(s)].cpu()
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def stock_last_layer_rows(loaded, sequences) -> list[torch.Tensor]:
    """Stock fair-esm's last layer over `sequences` in one padded batch: each one's residue rows,
    the reference the bench's parity checks compare with."""
    _, _, tokens = loaded.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    reps = loaded.model(tokens.to(_device(loaded.model)), repr_layers=[loaded.num_layers])
    return [reps["representations"][loaded.num_layers][i, 1 : len(s) + 1] for i, s in enumerate(sequences)]


def max_abs_diff(rows, reference) -> float:
    """The largest |a - b| over matching lists of row tensors."""
    return max((torch.as_tensor(a) - b).abs().max().item() for a, b in zip(rows, reference))


def service_forward_pass(loaded, sequences, fast: bool, toks_per_batch: int = TOKS_PER_BATCH,
                         autocast: torch.dtype | None = None, last_layer=None) -> float:
    """Seconds for the service's forward (service.models.forward) over the same batches, in-process:
    the model's share of the service's time, without the serving layers. `last_layer`, if given,
    replaces the forward: tokens [B, T] -> the last layer [B, T, E] (bench.engines' compiled one)."""
    plan = BatchPlan(layers=frozenset({loaded.num_layers}), fast_attention=fast)
    last_layer = last_layer or (lambda tokens: forward(loaded.model, tokens, plan).representations[loaded.num_layers])
    device = _device(loaded.model)
    precision = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    start = time.perf_counter()
    for strs, tokens in _batches(loaded.alphabet, sequences, toks_per_batch, device):
        with precision:
            reps = last_layer(tokens)
        reps = reps.float().cpu()
        for i, s in enumerate(strs):
            reps[i, 1 : len(s) + 1].mean(0).clone()
    _sync(device)
    return time.perf_counter() - start


def packed_batches(sequences, toks_per_batch: int) -> list[list[int]]:
    """Sequence indexes, sorted by length, cut into batches of at most `toks_per_batch` real
    tokens (BOS and EOS included; a longer sequence goes alone): how the packed path batches."""
    batches, current, tokens = [], [], 0
    for i in sorted(range(len(sequences)), key=lambda i: len(sequences[i])):
        size = len(sequences[i]) + 2
        if current and tokens + size > toks_per_batch:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += size
    return batches + ([current] if current else [])


def service_packed_pass(loaded, sequences, toks_per_batch: int = TOKS_PER_BATCH,
                        autocast: torch.dtype | None = None) -> float:
    """Seconds for the service's packed forward (service.models.packed) over every sequence, mean of
    the last layer, batches of `toks_per_batch` real tokens."""
    from service.models.packed import pack, packed_forward

    plan = BatchPlan(layers=frozenset({loaded.num_layers}))
    device = _device(loaded.model)
    precision = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    start = time.perf_counter()
    for indices in packed_batches(sequences, toks_per_batch):
        rows = [torch.tensor(loaded.tokenize(tuple(sequences[i])), dtype=torch.int64) for i in indices]
        tokens, cu_seqlens = pack(rows)
        with precision:
            out = packed_forward(loaded.model, tokens.to(device, non_blocking=True), cu_seqlens, plan)
        reps = out.representations[loaded.num_layers].float().cpu()
        cu = cu_seqlens.tolist()
        for i, (begin, end) in enumerate(zip(cu[:-1], cu[1:])):
            reps[begin + 1 : end - 1].mean(0).clone()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def bare_model_seconds(loaded, sequence: str, repeats: int) -> float:
    """Median time of stock fair-esm on one sequence: the floor under any request's latency."""
    _, _, tokens = loaded.alphabet.get_batch_converter()([("x", sequence)])
    device = _device(loaded.model)
    tokens = tokens.to(device)
    loaded.model(tokens, repr_layers=[loaded.num_layers])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded.model(tokens, repr_layers=[loaded.num_layers])
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
