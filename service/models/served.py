"""A model as this server serves it: what was asked for, where it runs, its weights, its batch
budget and whether it is ready. Start-up fills one in per model and the handlers read it; it
replaces the per-model tuples and parallel maps that carried these facts before."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from esm2_wire.provenance import Provenance
from service.models.batch_budget import BudgetChoice
from service.models.checkpoints import LoadedModel
from service.models.forward import amino_acid_columns


def _server_version() -> str:
    try:
        return importlib.metadata.version("esm2-service")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


SERVER_VERSION = _server_version()

if TYPE_CHECKING:  # the spec is read here, never built: no import of the composition root
    import torch

    from service.config import ModelSpec


@dataclass(eq=False)
class ServedModel:
    spec: ModelSpec  # what the flags or models file asked for: source, device, precision, batching
    devices: list[torch.device]  # one worker, with its own copy of the model, per device
    loaded: LoadedModel
    budget: BudgetChoice | None = None  # padded tokens per batch: chosen once the model is on its device
    ready: bool = False  # warmed up on every worker
    # The logits' columns, in order: the 20 standard amino acids of the model's alphabet.
    vocabulary: list[str] = field(init=False)

    def __post_init__(self):
        alphabet = self.loaded.alphabet
        self.vocabulary = [alphabet.all_toks[i] for i in amino_acid_columns(alphabet)]

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16."""
        return self.spec.precision

    @property
    def provenance(self) -> Provenance:
        """What every result of this model carries (esm2_wire.provenance)."""
        loaded = self.loaded
        return Provenance(self.name, loaded.weights_fingerprint, loaded.random_weights, self.precision, SERVER_VERSION)

    @property
    def device_names(self) -> str:
        """The devices as callers see them: cpu, cuda:0 or cuda:0,cuda:1."""
        return ",".join(map(str, self.devices))
