"""The intake, in-process with fake workers: identical items computed once, callers who leave
a shared computation, the queue bound, the result cache.

Time is a fake clock (fakes.FakeClock), so deadlines follow from the test alone.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from fakes import FakeClock, FakeWorker, batch_lengths, busy, metric, model_input, run_on_fake_clock

from service.engine.policy import BatchLimits
from service.engine.result_cache import ResultCache
from service.engine.scheduler import Scheduler


# ---- identical items computed once -------------------------------------------------------
def test_identical_items_queued_together_are_computed_once():
    worker = FakeWorker(gate=threading.Event())
    merged_before = metric("esm_cache_merged_total")

    async def test(scheduler):
        blocker = scheduler.submit([model_input(10)])
        await busy(worker)
        one = scheduler.submit([model_input(40), model_input(40), model_input(41)])
        two = scheduler.submit([model_input(40)])
        worker.gate.set()
        results = await asyncio.gather(*blocker, *one, *two)
        return [float(r.mean[1][0]) for r in results]

    assert run_on_fake_clock(test, worker) == [10, 40, 40, 41, 40]
    assert sorted(map(sorted, batch_lengths(worker))) == [[10], [40, 41]]
    assert metric("esm_cache_merged_total") - merged_before == 2


def test_a_cancelled_caller_does_not_cancel_the_shared_computation():
    worker = FakeWorker(gate=threading.Event())

    async def test(scheduler):
        blocker = scheduler.submit([model_input(10)])
        await busy(worker)
        (queued_a,) = scheduler.submit([model_input(40)])
        (queued_b,) = scheduler.submit([model_input(40)])
        queued_a.cancel()  # while queued
        worker.gate.set()
        await asyncio.gather(*blocker)
        assert float((await queued_b).mean[1][0]) == 40

        worker.gate.clear()
        worker.started.clear()
        (running_a,) = scheduler.submit([model_input(60)])
        await busy(worker)
        (running_b,) = scheduler.submit([model_input(60)])  # joins the running computation
        running_a.cancel()
        worker.gate.set()
        assert float((await running_b).mean[1][0]) == 60

    run_on_fake_clock(test, worker)
    assert batch_lengths(worker) == [[10], [40], [60]]


def test_a_deadline_fails_only_its_own_caller_of_a_shared_item():
    from service.errors import DeadlineExceeded

    clock = FakeClock()
    worker = FakeWorker(gate=threading.Event())

    async def test(scheduler):
        blocker = scheduler.submit([model_input(10)])
        await busy(worker)
        (short,) = scheduler.submit([model_input(40)], deadline=1.0)
        (patient,) = scheduler.submit([model_input(40)], deadline=100.0)
        clock.now = 2.0
        worker.gate.set()
        await asyncio.gather(*blocker)
        assert float((await patient).mean[1][0]) == 40
        with pytest.raises(DeadlineExceeded):
            await short

    run_on_fake_clock(test, worker, clock)
    assert batch_lengths(worker) == [[10], [40]]


def test_the_queue_bound_counts_new_work_only():
    from service.errors import QueueFull

    worker = FakeWorker(gate=threading.Event())

    async def test(scheduler):
        blocker = scheduler.submit([model_input(10)])
        await busy(worker)
        dup = scheduler.submit([model_input(40)] * 3)  # one new item
        more = scheduler.submit([model_input(40), model_input(41)])  # one new item
        with pytest.raises(QueueFull):
            scheduler.submit([model_input(42)])
        worker.gate.set()
        await asyncio.gather(*blocker, *dup, *more)

    run_on_fake_clock(test, worker, max_queue_items=2)


def test_a_cached_result_is_answered_without_the_worker_and_cannot_be_changed():
    worker = FakeWorker()
    hits_before = metric("esm_cache_hits_total")

    async def test(scheduler):
        (fresh,) = await asyncio.gather(*scheduler.submit([model_input(40)]))
        (again,) = scheduler.submit([model_input(40)])
        assert again.done()  # answered at submit
        other_outputs = await asyncio.gather(*scheduler.submit([model_input(40, maps=True)]))
        return fresh, again.result(), other_outputs

    fresh, cached, _ = run_on_fake_clock(test, worker, cache=ResultCache(1 << 20))
    assert cached is fresh
    np.testing.assert_array_equal(cached.mean[1], [40])
    with pytest.raises(ValueError, match="read-only"):
        cached.mean[1][0] = 0
    assert batch_lengths(worker) == [[40], [40]]  # the second needs other outputs: computed
    assert metric("esm_cache_hits_total") - hits_before == 1


def test_results_are_cached_per_model_scope():
    worker = FakeWorker()

    async def test(scheduler):
        await asyncio.gather(*scheduler.submit([model_input(40, model="a")]))
        await asyncio.gather(*scheduler.submit([model_input(40, model="b")]))  # same tokens, other weights
        await asyncio.gather(*scheduler.submit([model_input(40, model="a")]))

    async def main():
        scheduler = Scheduler(worker, BatchLimits(max_wait_s=0.0), cache=ResultCache(1 << 20),
                              scopes={"a": "a|w1|fp32", "b": "b|w2|fp32"})
        scheduler.start()
        try:
            await test(scheduler)
        finally:
            await scheduler.close()

    asyncio.run(main())
    assert [[(i.model, i.length) for i in b] for b in worker.batches] == [[("a", 40)], [("b", 40)]]
