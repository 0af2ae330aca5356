"""Admission by estimated work (issue 31): policy.admit as a pure function over a fake clock and
fixed rates, and the scheduler refusing through it before anything is queued or run."""

import threading

import pytest
from fakes import RATE, FakeClock, FakeWorker, busy, entry, model_input, run_on_fake_clock

from service.engine.policy import BatchLimits, CostModel, Verdict, admit, work
from service.errors import BehindQueue, CannotFinish, InvalidRequest, QueueFull

LIMITS = BatchLimits()
COST = CostModel(learn=False, seconds_per_work=RATE)  # a 1,002-token pass is 1.98 s of fake time
PASS_SECONDS = RATE * work(1002, False)


def passes(count: int, length: int = 1002) -> list:
    return [model_input(length, token=n) for n in range(count)]


def test_a_request_whose_own_work_runs_past_its_deadline_cannot_finish():
    decision = admit(passes(10), [], 0.0, 1, now=100.0, deadline=110.0, limits=LIMITS, cost=COST)
    assert decision.verdict is Verdict.CANNOT_FINISH
    assert decision.own_seconds == pytest.approx(10 * PASS_SECONDS)
    assert decision.deadline_s == pytest.approx(10.0)
    # The same request without a deadline, or with one it fits in, is admitted.
    assert admit(passes(10), [], 0.0, 1, 100.0, None, LIMITS, COST).verdict is Verdict.ADMIT
    assert admit(passes(10), [], 0.0, 1, 100.0, 121.0, LIMITS, COST).verdict is Verdict.ADMIT


def test_the_estimate_follows_the_measured_rate_of_the_model_and_attention_mode():
    cost = CostModel(seconds_per_work=RATE)
    cost.observe([model_input(1002)], 4 * PASS_SECONDS)  # the model turned out 4x slower than thought
    decision = admit(passes(3), [], 0.0, 1, 0.0, 10.0, LIMITS, cost)
    assert decision.own_seconds == pytest.approx(12 * PASS_SECONDS)
    assert decision.verdict is Verdict.CANNOT_FINISH
    other = [model_input(1002, model="other")]  # another model keeps the initial rate
    assert admit(other, [], 0.0, 1, 0.0, 10.0, LIMITS, cost).own_seconds == pytest.approx(PASS_SECONDS)


def test_work_queued_due_before_the_request_counts_and_work_due_after_it_does_not():
    huge = [entry(2050, enqueued_at=0.0) for _ in range(4)]  # 6.2 s each, due at 24.6 s
    for n, queued in enumerate(huge):
        queued.input = model_input(2050, token=n)
    small = [model_input(50)]  # 0.05 s, due at 0.2 s: it overtakes the queued huge items
    assert admit(small, huge, 0.0, 1, 0.0, 1.0, LIMITS, COST).ahead_seconds == 0.0
    # A big request arriving now is due after the queued items: they run first.
    decision = admit(passes(5), huge, 0.0, 1, 0.0, 20.0, LIMITS, COST)
    assert decision.ahead_seconds == pytest.approx(4 * RATE * work(2050, False))
    assert decision.own_seconds < 20.0 < decision.seconds
    assert decision.verdict is Verdict.BEHIND_QUEUE
    assert decision.retry_after_s == int(decision.seconds - 20.0) + 1


def test_running_batches_count_and_the_work_spreads_over_the_workers():
    one = admit(passes(4), [], 8.0, 1, 0.0, None, LIMITS, COST)
    two = admit(passes(4), [], 8.0, 2, 0.0, None, LIMITS, COST)
    assert one.ahead_seconds == 8.0 and two.ahead_seconds == 4.0
    assert two.own_seconds == pytest.approx(one.own_seconds / 2)
    # One item runs on one worker, however many there are.
    assert admit(passes(1), [], 0.0, 4, 0.0, None, LIMITS, COST).own_seconds == pytest.approx(PASS_SECONDS)


def test_the_work_bound_counts_the_request_alone_and_with_the_queue():
    limits = BatchLimits(max_queue_work=work(1002, False) * 10)
    assert admit(passes(11), [], 0.0, 1, 0.0, None, limits, COST).verdict is Verdict.TOO_MUCH_WORK
    assert admit(passes(10), [], 0.0, 1, 0.0, None, limits, COST).verdict is Verdict.ADMIT
    queued = [entry(1002)]
    assert admit(passes(10), queued, 0.0, 1, 0.0, None, limits, COST).verdict is Verdict.QUEUE_FULL
    assert admit([], queued, 0.0, 1, 0.0, 0.0, limits, COST).verdict is Verdict.ADMIT  # nothing new: all cached


def test_the_scheduler_refuses_before_queueing_and_names_the_estimate_and_the_deadline():
    worker = FakeWorker(gate=threading.Event())
    clock = FakeClock()

    async def test(scheduler):
        running = scheduler.submit([model_input(10, token=99)])
        await busy(worker)
        with pytest.raises(CannotFinish) as alone:
            scheduler.submit(passes(10), deadline=clock.now + 5.0, alternative="the streaming RPC X")
        assert scheduler.queued_items == 0
        message = str(alone.value)
        assert "its model work alone is estimated at 19.82 s (10 forward passes of m on cpu" in message
        assert "its deadline is 5.00 s away; use the streaming RPC X, which returns results as they complete" in message
        queued = scheduler.submit(passes(3))  # 5.9 s of work, no deadline, due at 7.9, 15.9 and 23.8 s
        with pytest.raises(BehindQueue) as behind:  # due at 7.9 s: after the first queued pass and the running 10
            scheduler.submit([model_input(1002, token=50)], deadline=clock.now + 3.0)
        assert "estimated at 1.98 s (1 forward pass of m on cpu, 1,982 work units at 1e+03 us each" in str(behind.value)
        assert "after 1.99 s of work queued or running ahead of it, 3.98 s in all, and its deadline is 3.00 s away; " \
               "retry after 1 s" in str(behind.value)
        assert behind.value.retry_after_s == 1
        worker.gate.set()
        await running[0]
        for future in queued:
            await future

    run_on_fake_clock(test, worker, clock)
    assert [len(batch) for batch in worker.batches] and all(
        item.token_ids[0] in (99, 0, 1, 2) for batch in worker.batches for item in batch)


def test_the_scheduler_refuses_work_over_the_bound_as_invalid_and_behind_it_as_busy():
    worker = FakeWorker(gate=threading.Event())
    bound = work(1002, False) * 4

    async def test(scheduler):
        with pytest.raises(InvalidRequest, match=r"at most 7,930 are allowed \(--max-queue-work\)"):
            scheduler.submit(passes(5))
        scheduler.submit(passes(3))
        with pytest.raises(QueueFull, match=r"5,947 work units queued, and this request.s 3,959 would pass the bound of 7,930 \(--max-queue-work\); retry later"):
            scheduler.submit(passes(2, length=1001))
        worker.gate.set()

    run_on_fake_clock(test, worker, max_queue_work=bound)
