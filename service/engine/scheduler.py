"""Batches work items across concurrent requests and feeds the model workers.

Composes three pieces, each with one job: the intake (service.engine.intake: queue entries,
merging of identical items, the result cache, the queue bound, dropping callers that left),
the policy (service.engine.policy: which entry is due first, which entries form a batch, when
to stop waiting for more, what may run between a long batch's layers; pure functions) and
dispatch (service.engine.dispatch: worker slots and their threads, interleaving, worker loss).
What is left here is the loop that asks the policy and moves batches from one to the other.

Several workers (one per device) may serve the same models: each batch goes to whichever
worker is free. When every worker is busy, work that is due before a long running batch is
handed to that batch's worker to run between its layers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from esm2_wire.item_result import ItemResult
from service import metrics
from service.engine.dispatch import WORKER_LOST, Batch, BatchDone, Dispatcher, WorkerSlot
from service.engine.inputs import ModelInput
from service.engine.intake import Intake, QueueEntry
from service.engine.policy import Admission, BatchLimits, CostModel, Verdict, admit, batch_is_full, due, next_anchor, \
    runs_between_layers, take_batch
from service.engine.result_cache import ResultCache
from service.errors import BehindQueue, CannotFinish, Internal, InvalidRequest, Problem, QueueFull, WorkerLost
from service.request_context import RequestContext

if TYPE_CHECKING:  # the worker imports torch; the scheduler only hands it batches
    from service.engine.worker import ModelWorker

__all__ = ["WORKER_LOST", "BatchLimits", "CostModel", "Scheduler"]  # what callers import from here

log = logging.getLogger(__name__)
SCHEDULER_FAILURE = "scheduler failure; see the server log"


class Scheduler:
    def __init__(
        self,
        workers: ModelWorker | list[ModelWorker],
        limits: BatchLimits,
        cache: ResultCache | None = None,
        scopes: Mapping[str, str] | None = None,
        cost: CostModel | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limits = limits
        self.cost = cost or CostModel()
        self.clock = clock
        self.intake = Intake(limits, cache if cache is not None else ResultCache(0), dict(scopes or {}), clock)
        self.dispatch = Dispatcher(workers if isinstance(workers, list) else [workers], self)
        self._wake = asyncio.Event()  # work arrived or a worker came free
        self._task: asyncio.Task | None = None
        self._closing = False
        self.lost: str | None = None  # why a worker is gone, once one is
        # Called once when a worker is lost; the server then reports NOT_SERVING and exits.
        self.on_lost: Callable[[str], None] = lambda reason: None

    @property
    def queued_items(self) -> int:
        return len(self.intake)

    @property
    def slots(self) -> list[WorkerSlot]:
        return self.dispatch.slots

    @property
    def workers(self) -> list[ModelWorker]:
        return [slot.worker for slot in self.slots]

    # ---- the public surface ---------------------------------------------------------
    def submit(self, inputs: list[ModelInput], deadline: float | None = None,
               request: RequestContext | None = None, alternative: str = "") -> list[asyncio.Future]:
        """Queue all inputs of one request, or none of them; their futures, in order
        (service.engine.intake.Intake.submit says which inputs are new work). A request the
        admission policy refuses (policy.admit) raises before anything is queued; `alternative`
        (e.g. a streaming RPC) is named in that refusal as what to use instead."""
        if self.lost is not None:
            raise WorkerLost(WORKER_LOST)
        futures = self.intake.submit(inputs, deadline, request,
                                     admit=lambda new: self._admit(new, deadline, alternative))
        self._wake.set()
        return futures

    def _admit(self, new: list[ModelInput], deadline: float | None, alternative: str) -> None:
        running = sum(slot.running.seconds for slot in self.slots if slot.busy)
        decision = admit(new, self.intake.pending, running, len(self.slots), self.clock(), deadline,
                         self.limits, self.cost)
        if decision.verdict is not Verdict.ADMIT:
            metrics.ADMISSION_REFUSED.labels(new[0].model, decision.verdict.name).inc()
            raise self._refusal(decision, new, alternative)

    def _refusal(self, decision: Admission, new: list[ModelInput], alternative: str) -> Exception:
        """The error a refused request gets: the estimate, the deadline, what to do instead."""
        first = new[0]
        measured = (first.model, first.needs_maps) in self.cost.rates
        rate = self.cost.rate(first.model, first.needs_maps)
        devices = ",".join(sorted({slot.device for slot in self.slots}))
        passes = f"{len(new)} forward pass{'' if len(new) == 1 else 'es'} of {first.model}"
        estimate = (f"{passes} on {devices}, {decision.own_work:,.0f} work units at "
                    f"{rate * 1e6:.3g} us each ({'measured from the batches run so far' if measured else 'no batch measured yet'})")
        instead = (f"use {alternative}, which returns results as they complete, " if alternative else "") + \
            "split the work over smaller requests, or give a longer deadline"
        limit = self.limits.max_queue_work
        if decision.verdict is Verdict.TOO_MUCH_WORK:
            return InvalidRequest.of(Problem(
                "items", None, f"the request's model work is {decision.own_work:,.0f} work units ({passes}); at most "
                               f"{limit:,.0f} are allowed (--max-queue-work): split the work over smaller requests"))
        if decision.verdict is Verdict.QUEUE_FULL:
            return QueueFull(f"server busy: {decision.queued_work:,.0f} work units queued, and this request's "
                             f"{decision.own_work:,.0f} would pass the bound of {limit:,.0f} (--max-queue-work); retry later")
        if decision.verdict is Verdict.CANNOT_FINISH:
            return CannotFinish(
                f"the request cannot finish before its deadline: its model work alone is estimated at "
                f"{decision.own_seconds:.2f} s ({estimate}), and its deadline is {decision.deadline_s:.2f} s away; "
                f"{instead}")
        return BehindQueue(
            f"server busy: the request cannot finish before its deadline: its model work is estimated at "
            f"{decision.own_seconds:.2f} s ({estimate}) after {decision.ahead_seconds:.2f} s of work queued or running "
            f"ahead of it, {decision.seconds:.2f} s in all, and its deadline is {decision.deadline_s:.2f} s away; "
            f"retry after {decision.retry_after_s} s, or {instead}", decision.retry_after_s)

    async def run_now(self, inputs: list[ModelInput], worker: int = 0) -> list[ItemResult]:
        """Run `inputs` as one batch on one worker, ahead of the queue and the cache (warm-up);
        raises the first item's error."""
        return await self.dispatch.run_now(inputs, worker)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="esm-scheduler")
        self._task.add_done_callback(self._loop_ended)

    async def close(self) -> None:
        """Finish everything queued and running, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.dispatch.close()

    # ---- what dispatch reports (service.engine.dispatch.Outcomes) ---------------------
    def batch_done(self, done: BatchDone) -> None:
        if not done.batch.warm_up:  # a warm-up pass pays kernel selection and allocator growth
            self.cost.observe(done.batch.inputs, done.seconds)
        for entry, result in zip(done.batch.entries, done.results):
            self.intake.finish(entry, result)
        self._wake.set()

    def batch_failed(self, batch: Batch) -> None:
        self.intake.fail(batch.entries, Internal(SCHEDULER_FAILURE))

    def worker_lost(self, reason: str, entries: list[QueueEntry]) -> None:
        """Fail the entries in hand and everything queued with UNAVAILABLE; accept nothing more."""
        if self.lost is None:
            self.lost = reason
            log.critical("model worker lost: %s", reason)
            self.on_lost(reason)
        self.intake.fail(entries, WorkerLost(WORKER_LOST))
        self.intake.fail_queued(WorkerLost(WORKER_LOST))
        self._wake.set()

    def worker_free(self) -> None:
        self._wake.set()

    # ---- the loop -------------------------------------------------------------------
    def _loop_ended(self, task: asyncio.Task) -> None:
        if self._closing and not task.cancelled() and task.exception() is None:
            return
        self.worker_lost("scheduler stopped" if task.cancelled() else f"scheduler ended: {task.exception()!r}", [])

    def _next_batch(self) -> Batch:
        """Take the batch the policy picks next from the queue."""
        pending = self.intake.pending
        entries = take_batch(pending, self.limits, next_anchor(pending, self.limits, self.cost))
        now = self.clock()
        metrics.observe_queue_wait(entries, now)
        now_ns = time.time_ns()
        for entry in entries:  # each request hears how long its items waited (access log, trace)
            for waiter in entry.waiters:
                if waiter.request is not None:
                    waiter.request.batch_started(max(0.0, now - entry.enqueued_at), now_ns)
        return Batch(entries, min(due(entry, self.limits, self.cost) for entry in entries),
                     self.cost.batch_seconds(entries))

    def _interleave_due_work(self) -> None:
        """Every worker is busy: hand work that is due before a long running batch to that
        batch's worker, to run between its layers."""
        for slot in self.slots:
            if not slot.busy:
                continue
            pending = self.intake.pending
            while pending and runs_between_layers(next_anchor(pending, self.limits, self.cost), slot.running.due,
                                                  slot.running.seconds, self.limits, self.cost):
                slot.interleaver.hand_over(self._next_batch())

    async def _fill_window(self) -> None:
        """Give concurrent callers a moment to join before an idle worker starts."""
        pending = self.intake.pending
        deadline = min(it.enqueued_at for it in pending) + self.limits.max_wait_s
        while pending and not batch_is_full(pending, next_anchor(pending, self.limits, self.cost), self.limits):
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        while self.lost is None:
            batch: Batch | None = None
            try:
                self.intake.drop_dead()
                if self.intake.pending and self.dispatch.idle_slot() is None:
                    self._interleave_due_work()
                if not self.intake.pending or self.dispatch.idle_slot() is None:
                    if self._closing and not self.intake.pending:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._fill_window()
                self.intake.drop_dead()
                slot = self.dispatch.idle_slot()
                if not self.intake.pending or slot is None:
                    continue
                batch = self._next_batch()
                self.dispatch.start(batch, slot)
            except Exception:  # the loop must survive anything: fail what it held, keep serving
                log.exception("scheduler failure")
                if batch is not None:
                    self.batch_failed(batch)
                else:
                    self.intake.fail_queued(Internal(SCHEDULER_FAILURE))
