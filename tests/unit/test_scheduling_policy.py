"""The scheduling policy, in-process with fake workers: which work runs next, how big a
batch may get, which worker runs it, and identical items computed once.

Time is a fake clock that the fake worker advances by each batch's estimated run time,
so every expectation follows from the policy alone, never from how busy the machine is.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from fakes import FakeWorker, busy, entries, entry, model_input, run_scheduler
from prometheus_client import REGISTRY

from service.engine.result_cache import ResultCache
from service.engine.policy import BatchLimits, CostModel, next_anchor, take_batch, work
from service.engine.scheduler import Scheduler

RATE = 1e-3  # fake seconds per work unit: a 2,050-token item "runs" 6.2 s, a 50-token one 0.05 s


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def run(self, batch) -> None:
        """What the fake worker does: time passes as the batch's estimated run time."""
        self.now += RATE * work(max(i.length for i in batch), batch[0].needs_maps, len(batch))


def _run(test, workers, clock=None, cache=None, **limits):
    cost = CostModel(learn=False, seconds_per_work=RATE)
    return run_scheduler(test, workers, {"cache": cache, "cost": cost, "clock": clock or FakeClock()}, **limits)


def _lengths(worker: FakeWorker) -> list[list[int]]:
    return [[i.length for i in batch] for batch in worker.batches]


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# ---- which entry anchors the next batch ------------------------------------------------
def test_short_work_is_due_before_long_work_that_arrived_shortly_before_it():
    cost = CostModel(learn=False, seconds_per_work=RATE)
    huge, small = entry(2050, enqueued_at=0.0), entry(50, enqueued_at=1.0)
    assert next_anchor([huge, small], BatchLimits(aging=4.0), cost) is small
    # Arriving after the huge one's due time (0 + 4 x 6.2 s), the small one waits its turn.
    late = entry(50, enqueued_at=30.0)
    assert next_anchor([huge, late], BatchLimits(aging=4.0), cost) is huge
    # aging 0 is first come, first served.
    assert next_anchor([huge, small], BatchLimits(aging=0.0), cost) is huge


def test_a_full_length_item_runs_alone_under_the_token_pair_budget():
    limits = BatchLimits(max_batch_tokens=8192, max_batch_token_pairs=2048 * 2048)
    pending = entries([2050, 2050, 2050])
    assert _lengths_of(take_batch(pending, limits)) == [2050]  # 3 x 2050 tokens would fit the token budget
    pending = entries([1024] * 5)
    assert _lengths_of(take_batch(pending, limits)) == [1024] * 4  # 4 x 1024^2 = 2048^2
    pending = entries([1024] * 2, maps=True)  # attention maps weigh 3x: one 1024-token item alone
    assert _lengths_of(take_batch(pending, limits)) == [1024]
    pending = entries([512] * 6, maps=True)
    assert _lengths_of(take_batch(pending, limits)) == [512] * 5  # 5 x 512^2 x 3 <= 2048^2 < 6 x ...


def _lengths_of(batch) -> list[int]:
    return [e.length for e in batch]


def test_a_small_request_overtakes_a_huge_one_queued_before_it():
    clock = FakeClock()
    worker = FakeWorker(gate=threading.Event(), on_run=clock.run)

    async def test(scheduler):
        blocker = scheduler.submit([model_input(10)])
        await busy(worker)
        huge = scheduler.submit([model_input(2050, token=n) for n in (1, 2, 3)])
        clock.now += 0.5
        small = scheduler.submit([model_input(50)])
        worker.gate.set()
        await asyncio.gather(*blocker, *huge, *small)
        return [float(f.result().mean[1][0]) for f in small]

    assert _run(test, worker, clock) == [50]
    # The huge request runs one item per batch, after the small one: first come, first served
    # would have run [2050, 2050, 2050] as one batch, then [50].
    assert _lengths(worker) == [[10], [50], [2050], [2050], [2050]]


def test_a_requests_later_items_are_due_later_as_they_run_one_after_another():
    clock = FakeClock()
    worker = FakeWorker(gate=threading.Event(), on_run=clock.run)

    async def test(scheduler):
        blocker = scheduler.submit([model_input(10)])
        await busy(worker)
        huge = scheduler.submit([model_input(2050, token=n) for n in (1, 2, 3)])  # due at 24.6, 49.2, 73.8 s
        clock.now = 30.0
        small = scheduler.submit([model_input(50)])  # due at 30.2 s
        worker.gate.set()
        await asyncio.gather(*blocker, *huge, *small)

    _run(test, worker, clock)
    assert _lengths(worker) == [[10], [2050], [50], [2050], [2050]]


def test_a_huge_item_is_never_starved_by_a_stream_of_small_ones():
    clock = FakeClock()
    worker = FakeWorker()
    aging = 4.0

    async def test(scheduler):
        loop = asyncio.get_running_loop()
        smalls: list[asyncio.Future] = []

        def submit_small():
            smalls.extend(scheduler.submit([model_input(50, token=len(smalls) % 20 + 1)]))

        def small_arrives_during_each_batch(batch):
            clock.run(batch)
            if len(smalls) < 2000:  # bounded: a starved item fails the test below
                loop.call_soon_threadsafe(submit_small)  # queued before this batch's results return

        worker.on_run = small_arrives_during_each_batch
        (huge,) = scheduler.submit([model_input(2050)])
        submit_small()
        await huge
        worker.on_run = clock.run
        await asyncio.gather(*smalls)
        return len(smalls)

    smalls = _run(test, worker, clock, aging=aging)
    due = aging * RATE * work(2050, False)  # 24.6 fake seconds after it arrived
    small_run = RATE * work(50, False)
    huge_at = _index_of(worker, 2050)
    assert huge_at > 100 and smalls > huge_at  # small work went first, and kept coming
    # It ran once its due time came: as soon as a newly arrived small one would be due after
    # it (arrival + aging x a small run), and no later than the small batch then running.
    started = sum(RATE * work(b[0].length, False, len(b)) for b in worker.batches[:huge_at])
    assert due - aging * small_run <= started <= due + small_run


def _index_of(worker: FakeWorker, length: int) -> int:
    return next(i for i, b in enumerate(worker.batches) if b[0].length == length)


# ---- several workers ------------------------------------------------------------------------
def test_each_batch_goes_to_whichever_worker_is_free():
    first, second = FakeWorker(gate=threading.Event()), FakeWorker(gate=threading.Event())

    async def test(scheduler):
        a = scheduler.submit([model_input(10)])
        await busy(first)
        b = scheduler.submit([model_input(100)])  # short: nothing is interleaved into it
        await busy(second)  # the first is busy, so the second takes it
        c = scheduler.submit([model_input(20)])
        first.gate.set()  # the first comes free and takes the queued one
        results = await asyncio.gather(*a, *c)
        second.gate.set()
        results += await asyncio.gather(*b)
        return [float(r.mean[1][0]) for r in results]

    assert _run(test, [first, second]) == [10, 20, 100]
    assert _lengths(first) == [[10], [20]]
    assert _lengths(second) == [[100]]


def test_an_item_failure_on_one_worker_fails_only_that_item():
    from service.errors import OutOfMemory

    first = FakeWorker(gate=threading.Event(), fail={12: OutOfMemory("does not fit")})
    second = FakeWorker()

    async def test(scheduler):
        failing = scheduler.submit([model_input(12)])
        await busy(first)
        ok = scheduler.submit([model_input(13)])
        assert float((await ok[0]).mean[1][0]) == 13  # the second worker serves while the first is held
        first.gate.set()
        with pytest.raises(OutOfMemory):
            await failing[0]

    _run(test, [first, second])


# ---- identical items computed once -------------------------------------------------------
def test_identical_items_queued_together_are_computed_once():
    worker = FakeWorker(gate=threading.Event())
    merged_before = _sample("esm_cache_merged_total")

    async def test(scheduler):
        blocker = scheduler.submit([model_input(10)])
        await busy(worker)
        one = scheduler.submit([model_input(40), model_input(40), model_input(41)])
        two = scheduler.submit([model_input(40)])
        worker.gate.set()
        results = await asyncio.gather(*blocker, *one, *two)
        return [float(r.mean[1][0]) for r in results]

    assert _run(test, worker) == [10, 40, 40, 41, 40]
    assert sorted(map(sorted, _lengths(worker))) == [[10], [40, 41]]
    assert _sample("esm_cache_merged_total") - merged_before == 2


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

    _run(test, worker)
    assert _lengths(worker) == [[10], [40], [60]]


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

    _run(test, worker, clock)
    assert _lengths(worker) == [[10], [40]]


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

    _run(test, worker, max_queue_items=2)


def test_a_cached_result_is_answered_without_the_worker_and_cannot_be_changed():
    worker = FakeWorker()
    hits_before = _sample("esm_cache_hits_total")

    async def test(scheduler):
        (fresh,) = await asyncio.gather(*scheduler.submit([model_input(40)]))
        (again,) = scheduler.submit([model_input(40)])
        assert again.done()  # answered at submit
        other_outputs = await asyncio.gather(*scheduler.submit([model_input(40, maps=True)]))
        return fresh, again.result(), other_outputs

    fresh, cached, _ = _run(test, worker, cache=ResultCache(1 << 20))
    assert cached is fresh
    np.testing.assert_array_equal(cached.mean[1], [40])
    with pytest.raises(ValueError, match="read-only"):
        cached.mean[1][0] = 0
    assert _lengths(worker) == [[40], [40]]  # the second needs other outputs: computed
    assert _sample("esm_cache_hits_total") - hits_before == 1


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


# ---- work due first runs between the layers of a long batch ---------------------------------
@pytest.mark.parametrize("small_arrives_at, order", [
    (0.5, [50, 2050]),  # due before the huge one: it runs between the huge one's layers
    (30.0, [2050, 50]),  # past the huge one's due time (4 x 6.2 s): it waits for the end
])
def test_work_due_before_a_long_batch_runs_between_its_layers_on_the_same_worker(small_arrives_at, order):
    clock = FakeClock()
    worker = FakeWorker(gate=threading.Event(), layers=6)
    finished: list[int] = []

    async def test(scheduler):
        (huge,) = scheduler.submit([model_input(2050)])
        huge.add_done_callback(lambda f: finished.append(2050))
        await busy(worker)  # holds the huge batch before its first layer
        clock.now += small_arrives_at
        (small,) = scheduler.submit([model_input(50)])
        small.add_done_callback(lambda f: finished.append(50))
        await asyncio.sleep(0)  # the loop hands the small one to the busy worker, or keeps it queued
        worker.gate.set()
        await asyncio.gather(huge, small)

    _run(test, worker, clock)
    assert finished == order
    assert _lengths(worker) == [[2050], [50]]  # either way one worker, one batch each
