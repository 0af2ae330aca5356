"""Batches to model workers: one slot per worker, each with the single thread that runs it.

Runs on the event loop and never blocks it: batches go to worker threads through
`run_in_executor`. A batch that holds a worker for long (a full-length sequence with every
output) does not make work that is due before it wait for its end: the scheduler hands such
work to the slot's `Interleaver`, which the forward pass calls between layers
(service.models.forward.LayerHook), so it runs on the same worker thread and a small request
waits about one layer, not the whole batch.

A worker that raises out of a batch (DeviceUnusable, or its thread died) is lost: the batch in
hand, whatever was handed over to run between its layers and everything queued fail with
WorkerLost, and the server stops serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from service.engine.interleaving import RunAfterRunningBatch

from esm2_wire.item_result import ItemResult
from service import metrics, tracing
from service.engine.inputs import ModelInput
from service.engine.intake import QueueEntry, Waiter
from service.errors import ServiceError, WorkerLost

if TYPE_CHECKING:  # the worker imports torch; dispatch only hands it batches
    from service.engine.worker import ModelWorker

log = logging.getLogger(__name__)
WORKER_LOST = "the model worker failed and this server is restarting; retry the request"


@dataclass(frozen=True)
class Batch:
    """Entries handed to a worker together, with what the policy expects of them."""

    entries: list[QueueEntry]
    due: float = 0.0  # the earliest due time among its entries (scheduler clock)
    seconds: float = 0.0  # estimated run time
    warm_up: bool = False  # run ahead of the queue at start-up: its time teaches the cost model nothing

    @property
    def inputs(self) -> list[ModelInput]:
        return [entry.input for entry in self.entries]


@dataclass(frozen=True)
class BatchDone:
    """A batch a worker ran, its results in entry order, and the seconds it took."""

    batch: Batch
    results: list[ItemResult | ServiceError]
    seconds: float
    started_ns: int = 0  # wall clock (time.time_ns), for trace spans
    ended_ns: int = 0
    forward_ns: tuple[int, int] | None = None  # the forward pass's start and end, when the worker says


class Outcomes(Protocol):
    """What dispatch tells the scheduler, always on the event loop."""

    def batch_done(self, done: BatchDone) -> None: ...
    def batch_failed(self, batch: Batch) -> None: ...
    def worker_lost(self, reason: str, entries: list[QueueEntry]) -> None: ...
    def worker_free(self) -> None: ...


class Interleaver:
    """The layer hook of one worker (it satisfies service.models.forward.LayerHook): between two
    layers of the running batch, on the worker thread, runs the batches handed over for that,
    and reports each back to the loop. An interleaved batch runs through: nothing nests in it."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self._handed: queue.SimpleQueue[Batch] = queue.SimpleQueue()  # put by the loop, taken by the thread
        self._after: queue.SimpleQueue[Batch] = queue.SimpleQueue()  # out of memory between layers: run after
        self._inside = False  # running an interleaved batch
        self._between = False  # ... between the running batch's layers (not after its last)
        self.seconds = 0.0  # of the running batch's time, spent on interleaved ones
        self._report: Callable[..., object] = lambda callback, *args: callback(*args)
        self._done: Callable[[BatchDone], None] = lambda done: None
        self._failed: Callable[[Batch], None] = lambda batch: None

    def attach(self, report: Callable[..., object], done: Callable[[BatchDone], None],
               failed: Callable[[Batch], None]) -> None:
        """Where reports go: `report(done, BatchDone)` or `report(failed, Batch)`; `report` is
        the loop's call_soon_threadsafe."""
        self._report, self._done, self._failed = report, done, failed

    def hand_over(self, batch: Batch) -> None:
        self._handed.put(batch)

    def has_work(self) -> bool:
        return not (self._handed.empty() and self._after.empty())

    def take_stranded(self) -> list[QueueEntry]:
        """Entries handed over that never ran (the worker was lost)."""
        stranded = []
        for handed in (self._handed, self._after):
            while not handed.empty():
                stranded += handed.get_nowait().entries
        return stranded

    def between_layers(self) -> None:
        if self._handed.empty():  # the common case: nothing to wait for
            return
        self._between = True
        try:
            self.run_handed_over()
        finally:
            self._between = False

    def run_handed_over(self) -> None:
        """Run every batch handed over, one after another (also after the running batch's last layer)."""
        if self._inside:  # called from the forward pass of a batch this runs
            return
        self._inside = True
        try:
            self._run_handed_over()
        finally:
            self._inside = False

    def _run_handed_over(self) -> None:
        while True:
            try:
                batch = self._handed.get_nowait() if self._between else self._after_first()
            except queue.Empty:
                return
            self.worker.settle()  # on CUDA: the running batch's queued layers first, outside the timing
            started, started_ns = time.perf_counter(), time.time_ns()
            try:
                results = self.worker.run(batch.inputs)
            except RunAfterRunningBatch:
                self._after.put(batch)
                continue
            except BaseException:  # fail its items, then let the running batch see the error
                self._report(self._failed, batch)
                raise
            seconds = time.perf_counter() - started
            self.seconds += seconds  # read by the loop once the running batch is done
            metrics.INTERLEAVED_BATCHES.inc()
            self._report(self._done, BatchDone(batch, results, seconds, started_ns, time.time_ns(),
                                               getattr(self.worker, "last_forward_ns", None)))

    def _after_first(self) -> Batch:
        """After the running batch: what ran out of memory between its layers first, then the rest."""
        return self._after.get_nowait() if not self._after.empty() else self._handed.get_nowait()


@dataclass(eq=False)
class WorkerSlot:
    """One model worker, the thread that runs it, its layer hook and its name in metrics."""

    worker: ModelWorker
    name: str
    executor: ThreadPoolExecutor
    interleaver: Interleaver = field(init=False)
    busy: bool = False
    running: Batch = field(default_factory=lambda: Batch([]))  # the batch it runs (or last ran)

    def __post_init__(self) -> None:
        self.interleaver = Interleaver(self.worker)
        self.worker.layer_hook = self.interleaver  # the worker calls it between its batch's layers

    @property
    def device(self) -> str:
        return str(getattr(self.worker, "device", "cpu"))


class Dispatcher:
    """The worker slots of one scheduler, and the batches running on them."""

    def __init__(self, workers: list[ModelWorker], outcomes: Outcomes):
        self.slots = [
            WorkerSlot(w, str(i), ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"esm-model-worker-{i}",
                                                     initializer=w.bind_thread))
            for i, w in enumerate(workers)
        ]
        self.outcomes = outcomes
        self._running: set[asyncio.Task] = set()

    def idle_slot(self) -> WorkerSlot | None:
        return next((slot for slot in self.slots if not slot.busy), None)

    def start(self, batch: Batch, slot: WorkerSlot) -> None:
        """Run `batch` on `slot` in the background; the slot is busy until it ends."""
        slot.busy = True
        slot.running = batch
        task = asyncio.get_running_loop().create_task(self._run_and_free(batch, slot))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_and_free(self, batch: Batch, slot: WorkerSlot) -> None:
        try:
            await self.run_once(batch, slot)
        except WorkerLost:  # run_once failed everything; the server is exiting
            pass
        except Exception:  # fail what it held; the worker and the loop keep serving
            log.exception("scheduler failure on worker %s", slot.name)
            self.outcomes.batch_failed(batch)
        finally:
            slot.busy = False
            self.outcomes.worker_free()

    async def run_once(self, batch: Batch, slot: WorkerSlot) -> None:
        """Run one batch on a worker thread, then what was handed over after its last layer."""
        loop = asyncio.get_running_loop()
        hook = slot.interleaver
        hook.attach(loop.call_soon_threadsafe, lambda done: self._batch_done(done, slot), self.outcomes.batch_failed)
        hook.seconds = 0.0
        started, started_ns = time.perf_counter(), time.time_ns()
        metrics.WORKER_BUSY.inc()
        try:
            results = await loop.run_in_executor(slot.executor, slot.worker.run, batch.inputs)
            ended_ns, forward_ns = time.time_ns(), getattr(slot.worker, "last_forward_ns", None)
            while hook.has_work():  # handed over after the batch's last layer
                await loop.run_in_executor(slot.executor, hook.run_handed_over)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # DeviceUnusable, or the thread died (SystemExit...): never serve on
            self.outcomes.worker_lost(f"{type(exc).__name__}: {exc}", [*batch.entries, *hook.take_stranded()])
            raise WorkerLost(WORKER_LOST) from exc
        finally:
            metrics.WORKER_BUSY.dec()
        self._batch_done(BatchDone(batch, results, time.perf_counter() - started - hook.seconds, started_ns, ended_ns,
                                   forward_ns), slot)

    def _batch_done(self, done: BatchDone, slot: WorkerSlot) -> None:
        metrics.observe_batch(done.batch.inputs, done.seconds)
        metrics.WORKER_BATCHES.labels(slot.name, slot.device).inc()
        metrics.WORKER_SECONDS.labels(slot.name, slot.device).inc(done.seconds)
        trace_batch(done)
        self.outcomes.batch_done(done)

    async def run_now(self, inputs: list[ModelInput], worker: int = 0) -> list[ItemResult]:
        """Run `inputs` as one batch on one worker, ahead of the queue and the cache (warm-up);
        raises the first item's error."""
        loop = asyncio.get_running_loop()
        batch = Batch([QueueEntry(item, [Waiter(loop.create_future())]) for item in inputs], warm_up=True)
        await self.run_once(batch, self.slots[worker])
        return [entry.waiters[0].future.result() for entry in batch.entries]

    async def close(self) -> None:
        """Wait for every running batch, then stop the worker threads."""
        while self._running:
            await asyncio.gather(*list(self._running))
        for slot in self.slots:
            slot.executor.shutdown(wait=True)


def trace_batch(done: BatchDone) -> None:
    """The batch's `batch` and `forward` spans in the trace of every request it served
    (service.tracing says why per request rather than one span with links)."""
    if not tracing.enabled():
        return
    requests = {id(w.request): w.request for entry in done.batch.entries for w in entry.waiters
                if w.request is not None and w.request.span is not None}
    if not requests:
        return
    inputs = done.batch.inputs
    tokens = sum(item.length for item in inputs)
    padded = len(inputs) * max(item.length for item in inputs)
    attributes = {"esm.model": inputs[0].model, "esm.batch.id": tracing.next_batch_id(),
                  "esm.batch.size": len(inputs), "esm.batch.tokens": tokens, "esm.batch.padded_tokens": padded,
                  "esm.batch.padding_efficiency": tokens / padded, "esm.batch.requests": len(requests)}
    for request in requests.values():
        batch_span = tracing.record("batch", request.span, done.started_ns, done.ended_ns, **attributes)
        if done.forward_ns is not None:
            tracing.record("forward", batch_span, *done.forward_ns, **{"esm.model": inputs[0].model})
