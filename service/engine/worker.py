"""The one thread that owns the device and calls the models.

fair-esm's rotary-embedding cache is mutable module state that breaks under
concurrent calls with different lengths, so nothing else ever runs a model. The
worker takes ready-made batches of token ids and returns numpy outputs per item;
it never sees a request message.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging


import numpy as np
import torch

from esm2_wire import output_kinds
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from service.models.checkpoints import LoadedModel
from service.errors import Internal, OutOfMemory, ServiceError
from service.engine.faults import FaultHook
from service.engine.inputs import ModelInput
from service.models.forward import BatchPlan, forward
from service.models.packed import pack, packed_forward
from service.models.precision import AUTOCAST_DTYPES
from service.models.quantize import quantize_layers

log = logging.getLogger(__name__)


class DeviceUnusable(Exception):
    """The device fails every call (e.g. after a CUDA device-side assert): only a restart helps."""


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested}: CUDA is not available on this machine")
    return device


def resolve_devices(requested: str) -> list[torch.device]:
    """`--device` as a comma-separated list: one model worker per entry (`cpu,cpu` runs two on CPU)."""
    names = [name.strip() for name in requested.split(",") if name.strip()]
    if not names:
        raise RuntimeError(f"--device {requested!r}: no device named")
    return [resolve_device(name) for name in names]


def replicate(models: dict[str, LoadedModel], devices: list[torch.device]) -> list[dict[str, LoadedModel]]:
    """One set of models per worker. Every worker gets its own modules, CPU workers too:
    fair-esm's attention layers keep a rotary cache that concurrent calls would share.
    Copies are made before any worker moves its set to its device."""
    copies = [models]
    for _ in devices[1:]:
        copies.append({name: dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
                       for name, loaded in models.items()})
    return copies


def _out_of_memory(exc: Exception) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a plain RuntimeError.
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    # A copy, so that no item keeps the whole batch's tensor alive.
    return tensor.float().cpu().numpy().copy()


class ModelWorker:
    def __init__(
        self,
        models: dict[str, LoadedModel],
        device: torch.device,
        precision: str = "fp32",
        fast_attention: bool = True,
        simulate_oom_above_tokens: int = 0,
        faults: FaultHook | None = None,
        packed: bool = False,
    ):
        self.models = models
        self.device = device
        self.precision = precision
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.fast_attention = fast_attention
        self.packed = packed  # batches that need no attention maps take the packed path (service.models.packed)
        # Testing aid: behave as if the device ran out of memory on larger batches.
        self.simulate_oom_above_tokens = simulate_oom_above_tokens
        self.faults = faults  # None unless armed at start-up (service.engine.faults)
        for loaded in models.values():
            loaded.model.to(device)
            if precision == "int8":  # this worker's own copy (replicate), quantized once here
                quantize_layers(loaded.model)

    def run(self, batch: list[ModelInput], between_layers=None) -> list[ItemResult | ServiceError]:
        """Compute a batch (all items of one model).

        A failing batch fails only its own items, unless the device fails too: then
        DeviceUnusable, since every later call would fail as well. `between_layers` is called
        between the model's layers (see esm_forward.forward).
        """
        try:
            if self.faults is not None:
                self.faults.before_batch()
            return self._run(batch, between_layers)
        except Exception as exc:
            if not _out_of_memory(exc):
                log.exception("batch of %d items failed", len(batch))
                if not self.device_usable():
                    raise DeviceUnusable(f"{self.device} fails every call after: {exc}") from exc
                return [Internal("model failure; see the server log") for _ in batch]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) == 1:
            return [OutOfMemory(f"a {batch[0].length - 2}-residue sequence does not fit in {self.device} memory")]
        half = len(batch) // 2
        log.warning("out of memory on a batch of %d; retrying as %d + %d", len(batch), half, len(batch) - half)
        return self.run(batch[:half]) + self.run(batch[half:])

    def device_usable(self) -> bool:
        """A tiny computation that must succeed; CUDA errors such as device-side asserts are sticky."""
        try:
            if self.faults is not None:
                self.faults.check_device()
            return torch.ones(1, device=self.device).add_(1).item() == 2.0  # .item() synchronizes
        except Exception:
            log.exception("device check failed on %s", self.device)
            return False

    def _run(self, batch: list[ModelInput], between_layers=None) -> list[ItemResult]:
        loaded = self.models[batch[0].model]
        width = max(item.length for item in batch)
        if self.simulate_oom_above_tokens and width * len(batch) > self.simulate_oom_above_tokens:
            raise torch.OutOfMemoryError(f"simulated: {len(batch)} x {width} tokens")
        plan = BatchPlan(
            layers=frozenset(layer for item in batch if output_kinds.per_layer(item.outputs) for layer in item.layers),
            outputs=frozenset().union(*(item.outputs for item in batch)),
            fast_attention=self.fast_attention,
        )
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            if self.packed and self.fast_attention and not plan.needs_maps:
                return self._run_packed(loaded, batch, plan, between_layers)
            tokens = torch.full((len(batch), width), loaded.alphabet.padding_idx, dtype=torch.int64)
            for row, item in enumerate(batch):
                tokens[row, : item.length] = torch.from_numpy(item.token_ids)
            out = forward(loaded.model, tokens.to(self.device), plan, between_layers)
        return [self._extract(out, row, item) for row, item in enumerate(batch)]

    def _run_packed(self, loaded, batch: list[ModelInput], plan: BatchPlan, between_layers) -> list[ItemResult]:
        tokens, cu_seqlens = pack([torch.from_numpy(item.token_ids) for item in batch])
        out = packed_forward(loaded.model, tokens.to(self.device), cu_seqlens, plan, between_layers)
        cu = cu_seqlens.tolist()
        rows = list(zip(cu[:-1], cu[1:]))  # each item's tokens in the packed tensors, as a batch row
        out.representations = {layer: [rep[a:b] for a, b in rows] for layer, rep in out.representations.items()}
        if out.logits is not None:
            out.logits = [out.logits[a:b] for a, b in rows]
        return [self._extract(out, row, item) for row, item in enumerate(batch)]

    @staticmethod
    def _extract(out, row: int, item: ModelInput) -> ItemResult:
        residues = item.length - 2
        result = ItemResult()
        for layer in item.layers:
            if layer not in out.representations:
                continue
            rep = out.representations[layer][row]
            if OutputKind.MEAN in item.outputs:
                result.mean[layer] = _numpy(rep[1 : residues + 1].mean(0))
            if OutputKind.BOS in item.outputs:
                result.bos[layer] = _numpy(rep[0])
            if OutputKind.PER_TOKEN in item.outputs:
                result.per_token[layer] = _numpy(rep[1 : residues + 1])
        if OutputKind.LOGITS in item.outputs:
            result.logits = _numpy(out.logits[row][1 : residues + 1])
        if OutputKind.CONTACTS in item.outputs:
            result.contacts = _numpy(out.contacts[row, :residues, :residues])
        if OutputKind.ATTENTIONS in item.outputs:
            result.attentions = _numpy(out.attentions[row, 1 : residues + 1, 1 : residues + 1])
        return result
