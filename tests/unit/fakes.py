"""Small stand-ins for the unit tests: model inputs without a model, a worker without torch work.

Like vLLM's tests/v1/core/utils.py: the real scheduler runs in-process, fed by these.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from service.errors import ServiceError
from service.model_worker import ModelInput
from service.scheduler import QueueEntry


def model_input(length: int, model: str = "m", maps: bool = False) -> ModelInput:
    """An input of `length` tokens (BOS and EOS included); `maps`: it needs attention maps."""
    outputs = {OutputKind.CONTACTS} if maps else {OutputKind.MEAN}
    return ModelInput(model, torch.zeros(length, dtype=torch.int64), frozenset(outputs), (1,))


def entry(length: int, model: str = "m", maps: bool = False, enqueued_at: float = 0.0) -> QueueEntry:
    return QueueEntry(model_input(length, model, maps), future=None, enqueued_at=enqueued_at)


def entries(lengths, **kwargs) -> list[QueueEntry]:
    return [entry(n, **kwargs) for n in lengths]


class FakeWorker:
    """Answers each input with its length as a mean embedding; records every batch it ran.

    `gate`, when set, holds every batch until the test releases it, so a test decides what
    is queued while the worker is busy. `fail` maps a length to the error its item gets."""

    def __init__(self, gate: threading.Event | None = None, fail: dict[int, ServiceError] | None = None):
        self.batches: list[list[ModelInput]] = []
        self.gate = gate
        self.fail = fail or {}
        self.started = threading.Event()

    def run(self, batch: list[ModelInput]) -> list[ItemResult | ServiceError]:
        self.batches.append(batch)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)  # bounded: a test that forgets to release fails, not hangs
        return [self.fail.get(item.length) or ItemResult(mean={1: np.full(1, item.length, np.float32)})
                for item in batch]
