"""A lost model worker, in-process (the end-to-end case is tests/test_worker_faults.py): the
real Scheduler fails the batch in hand and everything queued with WorkerLost, refuses new work,
and tells the server once; the real ModelWorker tells a failing batch from an unusable device."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from fakes import FakeWorker, model_input

from service.errors import Internal, WorkerLost
from service.engine.faults import FaultHook
from service.engine.worker import DeviceUnusable, ModelWorker
from service.engine.policy import BatchLimits
from service.engine.scheduler import WORKER_LOST, Scheduler


class DyingWorker(FakeWorker):
    """Holds its first batch until released, then raises `death` from the worker thread."""

    def __init__(self, death: BaseException):
        super().__init__(gate=threading.Event())
        self.death = death

    def run(self, batch):
        super().run(batch)
        raise self.death


@pytest.mark.parametrize("death", [DeviceUnusable("cuda:0 fails every call"), SystemExit("thread died")])
def test_everything_accepted_fails_with_worker_lost_and_nothing_more_is_accepted(death):
    worker = DyingWorker(death)
    reasons: list[str] = []

    async def main():
        scheduler = Scheduler(worker, BatchLimits(max_wait_s=0.0, max_batch_size=1))
        scheduler.on_lost = reasons.append
        scheduler.start()
        running = scheduler.submit([model_input(10)])
        assert await asyncio.to_thread(worker.started.wait, 30)
        queued = scheduler.submit([model_input(20), model_input(21)])
        worker.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*running, *queued, return_exceptions=True), 30)
        with pytest.raises(WorkerLost):
            scheduler.submit([model_input(5)])
        await asyncio.wait_for(scheduler.close(), 30)
        return outcomes, scheduler.lost

    outcomes, lost = asyncio.run(main())
    assert all(isinstance(o, WorkerLost) and str(o) == WORKER_LOST for o in outcomes)
    assert len(reasons) == 1 and reasons[0] == lost and type(death).__name__ in lost
    assert len(worker.batches) == 1


@pytest.mark.parametrize("fault,outcome", [("batch-error", Internal), ("device-error", DeviceUnusable)])
def test_a_failing_batch_fails_its_items_unless_the_device_fails_too(tmp_path, fault, outcome):
    hook = FaultHook(tmp_path / "fault")
    worker = ModelWorker({}, torch.device("cpu"), faults=hook)
    (tmp_path / "fault").write_text(fault)
    if outcome is DeviceUnusable:
        with pytest.raises(DeviceUnusable):
            worker.run([model_input(10)])
        assert not worker.device_usable()  # sticky, like a CUDA device-side assert
    else:
        assert [type(r) for r in worker.run([model_input(10), model_input(11)])] == [Internal, Internal]
        assert worker.device_usable()
    assert not (tmp_path / "fault").exists()  # a fault fires once
