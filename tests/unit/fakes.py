"""Small stand-ins for the unit tests: model inputs without a model, a worker without torch work.

Like vLLM's tests/v1/core/utils.py: the real scheduler runs in-process, fed by these.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from prometheus_client import REGISTRY

import torch

from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from service import platforms
from service.engine.worker import ModelWorker, Progress
from service.errors import ServiceError
from service.engine.inputs import ModelInput
from service.engine.intake import QueueEntry
from service.engine.policy import BatchLimits, CostModel, work
from service.engine.scheduler import Scheduler


def model_input(length: int, model: str = "m", maps: bool = False, token: int = 0) -> ModelInput:
    """An input of `length` tokens (BOS and EOS included), all equal to `token`; `maps`: it
    needs attention maps. Inputs with equal arguments are identical (computed once)."""
    outputs = {OutputKind.CONTACTS} if maps else {OutputKind.MEAN}
    return ModelInput(model, np.full((length,), token, dtype=np.int64), frozenset(outputs), (1,))


def entry(length: int, model: str = "m", maps: bool = False, enqueued_at: float = 0.0) -> QueueEntry:
    return QueueEntry(model_input(length, model, maps), enqueued_at=enqueued_at)


def entries(lengths, **kwargs) -> list[QueueEntry]:
    return [entry(n, **kwargs) for n in lengths]


class FakeWorker:
    """Answers each input with its length as a mean embedding; records every batch it ran. Its
    device calls are ModelWorker's own, on the CPU (the CUDA ones run on the simulated device:
    tests/unit/test_simulated_cuda.py).

    `gate`, when set, holds every batch until the test releases it, so a test decides what
    is queued while the worker is busy. `fail` maps a length to the error its item gets."""

    def __init__(self, gate: threading.Event | None = None, fail: dict[int, ServiceError] | None = None,
                 on_run=None, layers: int = 1):
        self.layers = layers  # layer_hook is called layers - 1 times per batch, as the forward pass does
        self.layer_hook = None  # set by the scheduler's worker slot, as on ModelWorker
        self.batches: list[list[ModelInput]] = []
        self.on_run = on_run  # called with each batch before it is answered (e.g. to advance a fake clock)
        self.gate = gate
        self.fail = fail or {}
        self.started = threading.Event()
        self.platform, self.stream, self.progress = platforms.of(torch.device("cpu")), None, Progress()

    bind_thread = ModelWorker.bind_thread
    settle = ModelWorker.settle

    def run(self, batch: list[ModelInput]) -> list[ItemResult | ServiceError]:
        self.batches.append(batch)
        if self.on_run is not None:
            self.on_run(batch)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)  # bounded: a test that forgets to release fails, not hangs
        for _ in range(self.layers - 1 if self.layer_hook is not None else 0):
            self.layer_hook.between_layers()
        return [self.fail.get(item.length) or ItemResult(mean={1: np.full(1, item.length, np.float32)})
                for item in batch]


def run_scheduler(test, workers, scheduler_args: dict | None = None, **limits):
    """Run `test(scheduler)` on a fresh loop with a started Scheduler over `workers` (one
    FakeWorker or a list), batches formed at once (max_wait 0); then release every gate
    and close it."""
    workers = workers if isinstance(workers, list) else [workers]

    async def main():
        scheduler = Scheduler(workers, BatchLimits(max_wait_s=0.0, **limits), **(scheduler_args or {}))
        scheduler.start()
        try:
            return await test(scheduler)
        finally:
            for worker in workers:
                if getattr(worker, "gate", None) is not None:  # a ModelWorker has none
                    worker.gate.set()
            await asyncio.wait_for(scheduler.close(), 30)

    return asyncio.run(main())


async def busy(worker: FakeWorker) -> None:
    """Until the worker holds a batch (it stays there while its gate is closed)."""
    assert await asyncio.to_thread(worker.started.wait, 30)


# ---- a fake clock, for expectations that follow from the policy alone --------------------------
RATE = 1e-3  # fake seconds per work unit: a 2,050-token item "runs" 6.2 s, a 50-token one 0.05 s


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def run(self, batch) -> None:
        """What the fake worker does: time passes as the batch's estimated run time."""
        self.now += RATE * work(max(i.length for i in batch), batch[0].needs_maps, len(batch))


def run_on_fake_clock(test, workers, clock=None, cache=None, **limits):
    """run_scheduler with a fixed cost model (RATE) and a fake clock."""
    cost = CostModel(learn=False, seconds_per_work=RATE)
    return run_scheduler(test, workers, {"cache": cache, "cost": cost, "clock": clock or FakeClock()}, **limits)


def batch_lengths(worker: FakeWorker) -> list[list[int]]:
    return [[i.length for i in batch] for batch in worker.batches]


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0
