"""Will a model fit? Estimated from its shape before any weight is read.

Weights: the transformer's Linear layers in the compute dtype (service.models.precision casts
them once at load: 2 bytes under bf16/fp16), everything else in float32. On top, one batch's
working memory, counted for the worst batch the settings allow:
- the hidden states of a full token budget (residual stream, LayerNorm output, q/k/v/out and
  the 4x feed-forward);
- the per-layer representations a request may ask for, held until the response is copied off:
  every layer's [tokens, dim] in float32;
- one maximum-length sequence's attention maps on the exact path: about 7 [B, H, T, T] float32
  buffers are alive at once there (fair-esm's scores, their float copy and softmax, the
  padding-masked and EOS-masked copies, and the contact head's symmetrized and APC features);
- on CUDA, cuBLAS's workspace per stream and a share for the caching allocator's fragmentation
  (blocks of one size that cannot serve another).
Larger batches than that are handled at run time by the worker's out-of-memory split, so they
are not counted here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service import cgroup_limits, platforms

GIB = 1 << 30
BYTES_PER_WEIGHT = 4  # float32
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # of the cast Linear layers (precision.cast_weights)
VOCAB = 33
MAPS_BUFFERS = 7  # [B, H, T, T] float32 buffers alive at once on the exact path
CUBLAS_WORKSPACE_BYTES = 32 << 20  # cuBLAS's default on Hopper (CUBLAS_WORKSPACE_CONFIG=:4096:8), per stream
FRAGMENTATION = 0.15  # of the working memory: the caching allocator's blocks that do not fit the next shape


class DoesNotFit(RuntimeError):
    """The models assigned to a device need more memory than it has."""


def linear_parameter_count(layers: int, dim: int) -> int:
    """The parameters of the Linear layers cast to the compute dtype: each layer's q/k/v/out
    projections and feed-forward, and the LM head's dense layer."""
    per_layer = 4 * (dim * dim + dim) + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)
    return layers * per_layer + dim * dim + dim


def parameter_count(layers: int, dim: int, heads: int, vocab: int = VOCAB) -> int:
    """ESM-2's parameters (fair-esm's module, feed-forward 4 x dim)."""
    layer_norms = layers * 2 * 2 * dim
    lm_head_rest = 2 * dim + vocab  # LayerNorm, bias (decoder tied to the embedding)
    contact_head = layers * heads + 1
    return linear_parameter_count(layers, dim) + layer_norms + vocab * dim + 2 * dim + lm_head_rest + contact_head


def required_bytes(layers: int, dim: int, heads: int, max_batch_tokens: int, max_sequence_length: int,
                   precision: str = "fp32", device_type: str = "cpu") -> int:
    linear = linear_parameter_count(layers, dim)
    weights = linear * WEIGHT_BYTES.get(precision, BYTES_PER_WEIGHT) + \
        (parameter_count(layers, dim, heads) - linear) * BYTES_PER_WEIGHT
    hidden = max_batch_tokens * dim * 12 * 4
    representations = (layers + 1) * max_batch_tokens * dim * 4
    length = max_sequence_length + 2  # BOS/EOS
    maps = MAPS_BUFFERS * heads * length * length * 4
    working = hidden + representations + maps
    if device_type == "cuda":
        working += int(FRAGMENTATION * working) + CUBLAS_WORKSPACE_BYTES
    return weights + working


def available_bytes(device: torch.device, assume_gib: float | None = None) -> int:
    """Free memory on `device` now, or the operator's stated figure (--assume-available-memory-gib)."""
    if assume_gib is not None:
        return int(assume_gib * GIB)
    if device.type == "cuda":
        return platforms.of(device).free_bytes()
    return cgroup_limits.available_memory_bytes()  # the host's or the container's, the smaller


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
            where = f" ({cgroup_limits.describe_memory()})" if device.type == "cpu" and assume_gib is None else ""
            problems.append(
                f"{device} has {free / GIB:.2f} GiB available{where} but needs {total / GIB:.2f} GiB for {parts} "
                "(weights plus one batch's working memory: docs/gpus.md)"
            )
    if problems:
        raise DoesNotFit("models do not fit: " + "; ".join(problems)
                         + ". Use a bigger device, fewer models per device, or a smaller max_batch_tokens.")
