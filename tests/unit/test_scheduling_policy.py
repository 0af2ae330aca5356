"""The scheduling policy, in-process with fake workers: which work runs next, which worker runs
it, and what runs between a long batch's layers.

Time is a fake clock that the fake worker advances by each batch's estimated run time,
so every expectation follows from the policy alone, never from how busy the machine is.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from fakes import RATE, FakeClock, FakeWorker, batch_lengths, busy, model_input, run_on_fake_clock

from service.engine.policy import work

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

    assert run_on_fake_clock(test, worker, clock) == [50]
    # The huge request runs one item per batch, after the small one: first come, first served
    # would have run [2050, 2050, 2050] as one batch, then [50].
    assert batch_lengths(worker) == [[10], [50], [2050], [2050], [2050]]


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

    run_on_fake_clock(test, worker, clock)
    assert batch_lengths(worker) == [[10], [2050], [50], [2050], [2050]]


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

    smalls = run_on_fake_clock(test, worker, clock, aging=aging)
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

    assert run_on_fake_clock(test, [first, second]) == [10, 20, 100]
    assert batch_lengths(first) == [[10], [20]]
    assert batch_lengths(second) == [[100]]


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

    run_on_fake_clock(test, [first, second])


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

    run_on_fake_clock(test, worker, clock)
    assert finished == order
    assert batch_lengths(worker) == [[2050], [50]]  # either way one worker, one batch each
