"""Will a model fit? Estimated from its shape before any weight is read.

Weights are held in float32 whatever the precision (autocast computes in fp16/bf16 from
fp32 weights). On top, one batch's working memory: the hidden states of a full token
budget and one maximum-length sequence's attention maps. Larger batches than that are
handled at run time by the worker's out-of-memory split, so they are not counted here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 1 << 30
BYTES_PER_WEIGHT = 4  # float32
VOCAB = 33


class DoesNotFit(RuntimeError):
    """The models assigned to a device need more memory than it has."""


def parameter_count(layers: int, dim: int, heads: int, vocab: int = VOCAB) -> int:
    """ESM-2's parameters (fair-esm's module, feed-forward 4 x dim)."""
    per_layer = 4 * (dim * dim + dim) + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim) + 2 * 2 * dim
    lm_head = dim * dim + dim + 2 * dim + vocab  # dense, LayerNorm, bias (decoder tied)
    contact_head = layers * heads + 1
    return layers * per_layer + vocab * dim + 2 * dim + lm_head + contact_head


def required_bytes(layers: int, dim: int, heads: int, max_batch_tokens: int, max_sequence_length: int) -> int:
    weights = parameter_count(layers, dim, heads) * BYTES_PER_WEIGHT
    # Residual stream, LayerNorm output, q/k/v/out and the 4x feed-forward for the token budget.
    hidden = max_batch_tokens * dim * 12 * 4
    length = max_sequence_length + 2  # BOS/EOS
    # Scores, softmax and the reduced maps of one sequence, every head.
    maps = 3 * heads * length * length * 4
    return weights + hidden + maps


def available_bytes(device: torch.device, assume_gib: float | None = None) -> int:
    """Free memory on `device` now, or the operator's stated figure (--assume-available-memory-gib)."""
    if assume_gib is not None:
        return int(assume_gib * GIB)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Need:
    model: str
    device: torch.device
    layers: int
    dim: int
    heads: int
    bytes: int


def check_fits(needs: list[Need], assume_gib: float | None = None) -> None:
    """Raise DoesNotFit naming, per device, what the models need and what the device has."""
    problems = []
    for device in dict.fromkeys(n.device for n in needs):
        on_device = [n for n in needs if n.device == device]
        total = sum(n.bytes for n in on_device)
        free = available_bytes(device, assume_gib)
        if total > free:
            parts = ", ".join(
                f"{n.model} ({parameter_count(n.layers, n.dim, n.heads) / 1e6:,.1f}M parameters: {n.bytes / GIB:.2f} GiB)"
                for n in on_device
            )
            problems.append(
                f"{device} has {free / GIB:.2f} GiB available but needs {total / GIB:.2f} GiB for {parts} "
                "(float32 weights plus one batch's working memory)"
            )
    if problems:
        raise DoesNotFit("models do not fit: " + "; ".join(problems)
                         + ". Use a bigger device, fewer models per device, or a smaller max_batch_tokens.")
