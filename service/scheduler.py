"""Batches work items across concurrent requests and feeds the model worker.

Runs on the event loop and never blocks it: batches go to the worker thread through
`run_in_executor`. A batch holds items of one model and one attention mode (items that
need attention maps take the slower exact path, so they are not mixed with the rest),
of similar lengths, under a padded-token budget and a size cap. The oldest waiting
item anchors every batch, so no item starves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from esm2_wire.item_result import ItemResult
from service import metrics
from service.errors import DeadlineExceeded, Internal, QueueFull, ServiceError, WorkerLost
from service.model_worker import ModelInput, ModelWorker

log = logging.getLogger(__name__)
WORKER_LOST = "the model worker failed and this server is restarting; retry the request"


@dataclass(eq=False)
class QueueEntry:
    """One model input waiting for a batch, and where its result goes."""

    input: ModelInput
    future: asyncio.Future  # resolved with an ItemResult or a ServiceError
    deadline: float | None = None  # time.monotonic() seconds
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return self.input.length

    @property
    def batch_key(self) -> tuple[str, bool]:
        """Entries batch together only with equal keys: one model, one attention mode."""
        return self.input.model, self.input.needs_maps


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 8192  # padded tokens (batch size x longest item)
    max_batch_size: int = 64
    max_wait_s: float = 0.005  # how long an idle worker waits to fill a batch
    max_queue_items: int = 256
    min_padding_efficiency: float = 0.92  # real tokens / padded tokens a batch may not fall below


def take_batch(pending: list[QueueEntry], limits: BatchLimits) -> list[QueueEntry]:
    """Remove and return the next batch: the oldest entry plus its nearest-length peers."""
    anchor = pending[0]
    peers = sorted((it for it in pending if it.batch_key == anchor.batch_key), key=lambda it: it.length)
    lo = hi = peers.index(anchor)
    width = real = anchor.length  # real: tokens that are not padding
    while hi - lo + 1 < limits.max_batch_size:
        count = hi - lo + 2
        # Each neighbour that keeps the batch within budget and padding target, with the padding it adds:
        # a shorter item pads itself; a longer one widens every row. On CPU a batch of a few
        # hundred tokens already runs near full speed, so padding is pure waste.
        options = []
        if lo > 0:
            shorter = peers[lo - 1]
            if width * count <= limits.max_batch_tokens and \
                    real + shorter.length >= limits.min_padding_efficiency * width * count:
                options.append((width - shorter.length, -1))
        if hi + 1 < len(peers):
            longer = peers[hi + 1]
            if longer.length * count <= limits.max_batch_tokens and \
                    real + longer.length >= limits.min_padding_efficiency * longer.length * count:
                options.append(((longer.length - width) * (count - 1), 1))
        if not options:
            break
        if min(options)[1] < 0:
            lo -= 1
            real += peers[lo].length
        else:
            hi += 1
            width = peers[hi].length
            real += width
    batch = peers[lo : hi + 1]
    chosen = set(map(id, batch))
    pending[:] = [it for it in pending if id(it) not in chosen]
    return batch


class Scheduler:
    def __init__(self, worker: ModelWorker, limits: BatchLimits):
        self.worker = worker
        self.limits = limits
        self._pending: list[QueueEntry] = []
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esm-model-worker")
        self._task: asyncio.Task | None = None
        self._closing = False
        self.lost: str | None = None  # why the worker is gone, once it is
        # Called once when the worker is lost; the server then reports NOT_SERVING and exits.
        self.on_lost: Callable[[str], None] = lambda reason: None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="esm-scheduler")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        if self._closing and not task.cancelled() and task.exception() is None:
            return
        reason = "scheduler stopped" if task.cancelled() else f"scheduler ended: {task.exception()!r}"
        self._lose(reason, [])

    def _lose(self, reason: str, batch: list[QueueEntry]) -> None:
        """Fail the batch in hand and everything queued with UNAVAILABLE; accept nothing more."""
        if self.lost is None:
            self.lost = reason
            log.critical("model worker lost: %s", reason)
            self.on_lost(reason)
        for entry in [*batch, *self._pending]:
            if not entry.future.done():
                entry.future.set_exception(WorkerLost(WORKER_LOST))
        self._pending.clear()
        metrics.QUEUE_DEPTH.set(0)

    def submit(self, inputs: list[ModelInput], deadline: float | None = None) -> list[asyncio.Future]:
        """Queue all inputs of one request, or none of them; their futures, in order."""
        if self.lost is not None:
            raise WorkerLost(WORKER_LOST)
        if len(self._pending) + len(inputs) > self.limits.max_queue_items:
            metrics.REJECTED.inc()
            raise QueueFull(
                f"server busy: {len(self._pending)} items queued (limit {self.limits.max_queue_items}); retry later"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [QueueEntry(item, loop.create_future(), deadline, now) for item in inputs]
        self._pending.extend(entries)
        metrics.QUEUE_DEPTH.set(len(self._pending))
        self._arrived.set()
        return [entry.future for entry in entries]

    async def run_once(self, batch: list[QueueEntry]) -> None:
        """Run one batch on the worker thread and resolve its futures."""
        loop = asyncio.get_running_loop()
        inputs = [entry.input for entry in batch]
        started = time.perf_counter()
        metrics.WORKER_BUSY.set(1)
        try:
            results = await loop.run_in_executor(self._executor, self.worker.run, inputs)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # DeviceUnusable, or the thread died (SystemExit...): never serve on
            self._lose(f"{type(exc).__name__}: {exc}", batch)
            raise WorkerLost(WORKER_LOST) from exc
        finally:
            metrics.WORKER_BUSY.set(0)
        metrics.observe_batch(inputs, time.perf_counter() - started)
        for item, result in zip(batch, results):
            if item.future.done():  # cancelled while running
                continue
            if isinstance(result, ServiceError):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    async def run_now(self, inputs: list[ModelInput]) -> list[ItemResult]:
        """Run `inputs` as one batch ahead of the queue (warm-up); raises the first item's error."""
        loop = asyncio.get_running_loop()
        batch = [QueueEntry(item, loop.create_future()) for item in inputs]
        await self.run_once(batch)
        return [entry.future.result() for entry in batch]

    def _drop_dead(self) -> None:
        now = time.monotonic()
        alive = []
        for item in self._pending:
            if item.future.done():
                metrics.DROPPED.labels("cancelled").inc()
            elif item.deadline is not None and now >= item.deadline:
                metrics.DROPPED.labels("deadline").inc()
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            else:
                alive.append(item)
        self._pending[:] = alive
        metrics.QUEUE_DEPTH.set(len(alive))

    def _batch_is_full(self) -> bool:
        key = self._pending[0].batch_key
        same = [it for it in self._pending if it.batch_key == key]
        width = max(it.length for it in same)
        return len(same) >= self.limits.max_batch_size or width * len(same) >= self.limits.max_batch_tokens

    async def _fill_window(self) -> None:
        """Give concurrent callers a moment to join before an idle worker starts."""
        deadline = self._pending[0].enqueued_at + self.limits.max_wait_s
        while not self._batch_is_full():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        while self.lost is None:
            batch: list[QueueEntry] = []
            try:
                self._drop_dead()
                if not self._pending:
                    if self._closing:
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                await self._fill_window()
                self._drop_dead()
                if not self._pending:
                    continue
                batch = take_batch(self._pending, self.limits)
                metrics.QUEUE_DEPTH.set(len(self._pending))
                metrics.observe_queue_wait(batch, time.monotonic())
                await self.run_once(batch)
            except WorkerLost:
                return
            except Exception:  # the loop must survive anything: fail what it held, keep serving
                log.exception("scheduler failure")
                held = batch or self._pending[:]
                if not batch:
                    self._pending.clear()
                for item in held:
                    if not item.future.done():
                        item.future.set_exception(Internal("scheduler failure; see the server log"))

    async def close(self) -> None:
        """Finish everything queued, then stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
