"""The real Scheduler, in-process, with a fake worker: batching, deadlines, cancellation, queue bounds.

No model and no server: FakeWorker answers each input with its length, and a gate lets a
test hold the worker busy while it arranges the queue. Nothing here waits on a timer: each
step waits for the event it needs (bounded), so a busy machine changes nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fakes import FakeWorker, busy, model_input, run_scheduler

from service.errors import DeadlineExceeded, OutOfMemory, QueueFull


def test_one_request_runs_as_one_batch_and_each_item_gets_its_own_result():
    worker = FakeWorker()

    async def test(scheduler):
        futures = scheduler.submit([model_input(n) for n in (30, 31, 32)])
        return [float(r.mean[1][0]) for r in await asyncio.gather(*futures)]

    assert run_scheduler(test, worker) == [30, 31, 32]
    assert [[i.length for i in batch] for batch in worker.batches] == [[30, 31, 32]]


def test_work_queued_while_the_worker_is_busy_is_batched_across_requests():
    worker = FakeWorker(gate=threading.Event())

    async def test(scheduler):
        first = scheduler.submit([model_input(10)])
        await busy(worker)
        later = [scheduler.submit([model_input(n)])[0] for n in (20, 21, 22)]
        other_mode = scheduler.submit([model_input(21, maps=True)])
        worker.gate.set()
        await asyncio.gather(*first, *later, *other_mode)

    run_scheduler(test, worker)
    batches = [[(i.length, i.needs_maps) for i in b] for b in worker.batches]
    assert batches[0] == [(10, False)]
    # Which of the two goes first depends on their estimated run times (measured): either order.
    assert sorted(batches[1:]) == [[(20, False), (21, False), (22, False)], [(21, True)]]


def test_an_item_whose_deadline_passed_in_the_queue_fails_without_running():
    worker = FakeWorker(gate=threading.Event())

    async def test(scheduler):
        running = scheduler.submit([model_input(10)])
        await busy(worker)
        # Admitted (its estimate, about a millisecond, fits), then its deadline passes while it waits.
        late = scheduler.submit([model_input(40)], deadline=time.monotonic() + 0.05)
        on_time = scheduler.submit([model_input(41)], deadline=time.monotonic() + 60)
        await asyncio.sleep(0.1)
        worker.gate.set()
        await asyncio.gather(*running, *on_time)
        with pytest.raises(DeadlineExceeded, match="deadline passed while queued"):
            await late[0]

    run_scheduler(test, worker)
    assert 40 not in [i.length for batch in worker.batches for i in batch]


def test_a_cancelled_item_is_dropped_from_the_queue_and_never_run():
    worker = FakeWorker(gate=threading.Event())

    async def test(scheduler):
        running = scheduler.submit([model_input(10)])
        await busy(worker)
        (cancelled,) = scheduler.submit([model_input(50)])
        (kept,) = scheduler.submit([model_input(51)])
        cancelled.cancel()
        worker.gate.set()
        await asyncio.gather(*running, kept)

    run_scheduler(test, worker)
    assert [[i.length for i in b] for b in worker.batches] == [[10], [51]]


def test_a_full_queue_refuses_the_whole_request_and_asks_for_a_retry():
    worker = FakeWorker(gate=threading.Event())

    async def test(scheduler):
        running = scheduler.submit([model_input(10)])
        await busy(worker)  # the running batch no longer counts against the queue
        queued = scheduler.submit([model_input(20), model_input(21)])
        with pytest.raises(QueueFull, match=r"2 items queued \(limit 3\)") as refused:
            scheduler.submit([model_input(30), model_input(31)])  # all or none
        assert refused.value.retry_after_s == 1
        worker.gate.set()
        await asyncio.gather(*running, *queued)

    run_scheduler(test, worker, max_queue_items=3)
    assert [[i.length for i in b] for b in worker.batches] == [[10], [20, 21]]


def test_an_item_failure_reaches_only_that_item():
    worker = FakeWorker(fail={12: OutOfMemory("a 10-residue sequence does not fit")})

    async def test(scheduler):
        ok, failed = scheduler.submit([model_input(11), model_input(12)])
        assert float((await ok).mean[1][0]) == 11
        with pytest.raises(OutOfMemory, match="does not fit"):
            await failed

    run_scheduler(test, worker)
    assert len(worker.batches) == 1


def test_close_finishes_everything_already_queued():
    worker = FakeWorker(gate=threading.Event())

    async def test(scheduler):
        futures = scheduler.submit([model_input(10)])
        await busy(worker)
        futures += scheduler.submit([model_input(n) for n in (20, 500)])
        worker.gate.set()
        await asyncio.wait_for(scheduler.close(), 30)
        return [f.done() and not f.cancelled() and f.exception() is None for f in futures]

    assert run_scheduler(test, worker) == [True, True, True]


def test_queue_wait_is_observed_per_model_from_enqueue_to_batch_start():
    """esm_queue_wait_seconds (the autoscaling signal): one observation per entry, at least as long
    as the entry really waited behind a busy worker."""
    from service import metrics

    worker = FakeWorker(gate=threading.Event())

    def count_and_sum():
        samples = {s.name: s.value for s in metrics.QUEUE_WAIT.collect()[0].samples
                   if s.labels.get("model") == model_input(5).model}
        return samples.get("esm_queue_wait_seconds_count", 0.0), samples.get("esm_queue_wait_seconds_sum", 0.0)

    before_count, before_sum = count_and_sum()

    async def test(scheduler):
        first = scheduler.submit([model_input(10)])
        await busy(worker)
        waiting = scheduler.submit([model_input(11), model_input(12)])
        await asyncio.sleep(0.2)  # held behind the gate at least this long
        worker.gate.set()
        await asyncio.gather(*first, *waiting)

    run_scheduler(test, worker)
    count, total = count_and_sum()
    assert count - before_count == 3
    assert total - before_sum >= 2 * 0.2
