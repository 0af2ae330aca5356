"""Batches work items across concurrent requests and feeds the model workers.

Runs on the event loop and never blocks it: batches go to worker threads through
`run_in_executor`. A batch holds items of one model and one attention mode (items that
need attention maps take the slower exact path, so they are not mixed with the rest),
of similar lengths and depths, under a padded-token budget, a padded-token-pair budget (the
attention's quadratic work, so that a full-length sequence runs alone) and a size cap.

Depth: an item that asks only for representations up to layer k needs k layers, not all
(the forward stops at the batch's deepest item), and its work estimate says so. Items of
different depths share a batch only where that wastes little: a batch grows only while its
useful work (each item's tokens x its layers) stays at least `min_padding_efficiency` of
the work it computes (rows x longest item x deepest item). On CPU a batch of a few hundred
tokens already runs near full speed, so running items apart costs nothing but the waste
they would add: the same bound that limits padding limits depth waste. (So a layer-6 and a
layer-33 request run apart; layers 32 and 33 may share.)

Which item anchors the next batch: the one due first, where an item is due at its
arrival plus `aging` times the estimated run time of its request's items up to it. Short work overtakes long work that
arrived shortly before it, so a small request is not stuck behind a huge one for the
huge one's whole run; long work is never starved, since everything that arrives after
its due time is due after it.

A batch that holds a worker for long (a full-length sequence with every output) does not
make work that is due before it wait for its end: that work runs between its layers, on
the same worker thread, so a small request waits about one layer, not the whole batch.

Several workers (one per device) may serve the same models: each batch goes to
whichever worker is free. Identical items (same model, tokens, outputs and layers) are
computed once: one queued or running computation has many waiters, and a finished
result is kept in a byte-bounded cache (service.engine.result_cache).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from esm2_wire.item_result import ItemResult
from service import metrics
from service.errors import DeadlineExceeded, Internal, QueueFull, ServiceError, WorkerLost
from service.engine.inputs import ModelInput
from service.engine.result_cache import ResultCache, cache_key, freeze

if TYPE_CHECKING:  # the worker imports torch; the scheduler only hands it batches
    from service.engine.worker import ModelWorker

log = logging.getLogger(__name__)
WORKER_LOST = "the model worker failed and this server is restarting; retry the request"

# Work estimate of one item, in token units: linear in its tokens, plus the attention's
# quadratic term (about equal to the linear work at this many tokens, for the 8M-650M
# shapes on CPU), times a factor for the exact path that materializes attention maps.
# Only the ratios between items matter: the seconds per unit are measured as batches run.
QUADRATIC_TOKENS = 1024
MAPS_FACTOR = 3.0
INITIAL_SECONDS_PER_WORK = 2e-5  # until the first batch of a model is measured
# A running batch estimated to take longer than this lets work that is due before it run
# between its layers (on the same worker thread); shorter ones just finish first.
INTERLEAVE_MIN_SECONDS = 0.5
INTERLEAVE_MAX_SHARE = 0.25  # ... and only batches estimated at most this share of it
RATE_SMOOTHING = 0.3  # weight of the newest batch in the measured seconds per unit


def work(length: int, needs_maps: bool, count: int = 1, depth_share: float = 1.0) -> float:
    """Estimated work of `count` rows of `length` tokens (padding included), through
    `depth_share` of the model's layers (ModelInput.depth_share)."""
    return count * length * (1 + length / QUADRATIC_TOKENS) * (MAPS_FACTOR if needs_maps else 1.0) * depth_share


def batch_work(batch: list[ModelInput]) -> float:
    """Estimated work of a batch: every row as wide as its longest item, as deep as its deepest."""
    return work(max(item.length for item in batch), batch[0].needs_maps, len(batch),
                max(item.depth_share for item in batch))


@dataclass(eq=False)
class Waiter:
    """One caller awaiting an entry's result."""

    future: asyncio.Future  # resolved with an ItemResult or a ServiceError
    deadline: float | None = None  # scheduler clock seconds


@dataclass(eq=False)
class QueueEntry:
    """One model input waiting for a batch, and every caller awaiting its result."""

    input: ModelInput
    waiters: list[Waiter] = field(default_factory=list)
    enqueued_at: float = 0.0
    key: bytes | None = None  # the result's cache key; equal keys are computed once
    # Work of its request's items up to and including this one: the request's later items are
    # due later, as they run one after another (0: this entry's own work).
    request_work: float = 0.0

    @property
    def length(self) -> int:
        return self.input.length

    @property
    def work(self) -> float:
        return work(self.input.length, self.input.needs_maps, depth_share=self.input.depth_share)

    @property
    def batch_key(self) -> tuple[str, bool]:
        """Entries batch together only with equal keys: one model, one attention mode."""
        return self.input.model, self.input.needs_maps

    @property
    def work_until_done(self) -> float:
        return max(self.request_work, self.work)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 8192  # padded tokens (batch size x longest item)
    max_batch_size: int = 64
    max_wait_s: float = 0.005  # how long an idle worker waits to fill a batch
    max_queue_items: int = 256
    min_padding_efficiency: float = 0.92  # real tokens / padded tokens a batch may not fall below
    # batch size x longest item squared (x MAPS_FACTOR when the batch makes attention maps): the
    # attention's work; an item over it runs alone
    max_batch_token_pairs: int = 2048 * 2048
    aging: float = 4.0  # an item is due at arrival + aging x its estimated run time
    # The worker runs batches unpadded (service.models.packed): max_batch_tokens counts real tokens,
    # and the efficiency bound sees no padding, only layers an item did not ask for.
    packed: bool = False


class CostModel:
    """Seconds of model work expected, per model and attention mode, measured from batches run."""

    def __init__(self, learn: bool = True, seconds_per_work: float = INITIAL_SECONDS_PER_WORK):
        self.learn = learn
        self.initial = seconds_per_work
        self.rates: dict[tuple[str, bool], float] = {}  # batch key -> seconds per work unit

    def rate(self, model: str, needs_maps: bool) -> float:
        return self.rates.get((model, needs_maps), self.initial)

    def seconds(self, entry: QueueEntry) -> float:
        return entry.work * self.rate(*entry.batch_key)

    def batch_seconds(self, batch: list[QueueEntry]) -> float:
        return self.rate(*batch[0].batch_key) * batch_work([entry.input for entry in batch])

    def observe(self, batch: list[ModelInput], seconds: float) -> None:
        if not self.learn:
            return
        key = batch[0].model, batch[0].needs_maps
        rate = seconds / batch_work(batch)
        old = self.rates.get(key)
        self.rates[key] = rate if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate


def due(entry: QueueEntry, limits: BatchLimits, cost: CostModel) -> float:
    """Arrival + aging x the estimated run time of its request's work up to this entry."""
    return entry.enqueued_at + limits.aging * entry.work_until_done * cost.rate(*entry.batch_key)


def next_anchor(pending: list[QueueEntry], limits: BatchLimits, cost: CostModel) -> QueueEntry:
    """The entry due first (the oldest among equals)."""
    return min(pending, key=lambda entry: due(entry, limits, cost))


def take_batch(pending: list[QueueEntry], limits: BatchLimits, anchor: QueueEntry | None = None) -> list[QueueEntry]:
    """Remove and return the next batch: `anchor` (default: the oldest entry) plus its nearest peers
    in depth, then length."""
    anchor = pending[0] if anchor is None else anchor
    peers = sorted((it for it in pending if it.batch_key == anchor.batch_key),
                   key=lambda it: (it.input.depth_share, it.length))
    lo = hi = peers.index(anchor)
    width, depth = anchor.length, anchor.input.depth_share
    real = anchor.length * depth  # useful work: real tokens x the layers each needs
    tokens = anchor.length  # real tokens

    pair_weight = MAPS_FACTOR if anchor.input.needs_maps else 1.0

    def fits(rows: int, row_width: int, real_tokens: int) -> bool:
        return ((real_tokens if limits.packed else row_width * rows) <= limits.max_batch_tokens
                and row_width * row_width * rows * pair_weight <= limits.max_batch_token_pairs)

    while hi - lo + 1 < limits.max_batch_size:
        count = hi - lo + 2
        # Each neighbour that keeps the batch within budget and efficiency target, with the waste it
        # leaves (computed work that is padding or layers an item did not ask for): a shorter item
        # pads itself; a longer one widens every row; a deeper one deepens every row. On CPU a batch
        # of a few hundred tokens already runs near full speed, so waste is all that sharing costs.
        options = []
        for side, neighbour in ((-1, peers[lo - 1] if lo > 0 else None),
                                (1, peers[hi + 1] if hi + 1 < len(peers) else None)):
            if neighbour is None:
                continue
            grown_width, grown_tokens = max(width, neighbour.length), tokens + neighbour.length
            grown_depth = max(depth, neighbour.input.depth_share)
            computed = (grown_tokens if limits.packed else count * grown_width) * grown_depth
            useful = real + neighbour.length * neighbour.input.depth_share
            if fits(count, grown_width, grown_tokens) and useful >= limits.min_padding_efficiency * computed:
                options.append((computed - useful, side))
        if not options:
            break
        side = min(options)[1]
        if side < 0:
            lo -= 1
        else:
            hi += 1
        joined = peers[lo if side < 0 else hi]
        width, depth = max(width, joined.length), max(depth, joined.input.depth_share)
        real += joined.length * joined.input.depth_share
        tokens += joined.length
    batch = peers[lo : hi + 1]
    chosen = set(map(id, batch))
    pending[:] = [it for it in pending if id(it) not in chosen]
    return batch


@dataclass(eq=False)
class WorkerSlot:
    """One model worker, the thread that runs it, and its name in metrics."""

    worker: ModelWorker
    name: str
    executor: ThreadPoolExecutor
    busy: bool = False
    running_due: float = 0.0  # of the batch it runs
    running_seconds: float = 0.0  # estimated, of the batch it runs
    # Batches to run between the layers of the running one (put by the loop, taken by the worker thread).
    interleaved: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    interleaved_seconds: float = 0.0  # of the running batch's time, spent on interleaved ones

    @property
    def device(self) -> str:
        return str(getattr(self.worker, "device", "cpu"))


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
        workers = workers if isinstance(workers, list) else [workers]
        self.slots = [
            WorkerSlot(w, str(i), ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"esm-model-worker-{i}"))
            for i, w in enumerate(workers)
        ]
        self.limits = limits
        self.cache = cache if cache is not None else ResultCache(0)
        self.scopes = dict(scopes or {})  # model -> identity of its weights and numerics (cache keys)
        self.cost = cost or CostModel()
        self.clock = clock
        self._pending: list[QueueEntry] = []
        self._inflight: dict[bytes, QueueEntry] = {}  # queued or running, by cache key
        self._running: set[asyncio.Task] = set()
        self._wake = asyncio.Event()  # work arrived or a worker came free
        self._task: asyncio.Task | None = None
        self._closing = False
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self.lost: str | None = None  # why a worker is gone, once one is
        # Called once when a worker is lost; the server then reports NOT_SERVING and exits.
        self.on_lost: Callable[[str], None] = lambda reason: None

    @property
    def queued_items(self) -> int:
        return len(self._pending)

    @property
    def workers(self) -> list[ModelWorker]:
        return [slot.worker for slot in self.slots]

    def start(self) -> None:
        self._loop_ref = asyncio.get_running_loop()
        self._task = self._loop_ref.create_task(self._loop(), name="esm-scheduler")
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
            self._finish(entry, WorkerLost(WORKER_LOST))
        self._pending.clear()
        self._wake.set()

    # ---- intake ------------------------------------------------------------------
    def _key(self, item: ModelInput) -> bytes:
        return cache_key(self.scopes.get(item.model, item.model), item)

    def submit(self, inputs: list[ModelInput], deadline: float | None = None) -> list[asyncio.Future]:
        """Queue all inputs of one request, or none of them; their futures, in order.

        Inputs already cached are answered at once; inputs equal to one queued or running
        (this request's own duplicates included) wait for it; only the rest are new work,
        and only new work counts against the queue bound."""
        if self.lost is not None:
            raise WorkerLost(WORKER_LOST)
        keys = [self._key(item) for item in inputs]
        new_keys = {k for k in keys if k not in self._inflight and not self.cache.contains(k)}
        if len(self._pending) + len(new_keys) > self.limits.max_queue_items:
            metrics.REJECTED.inc()
            raise QueueFull(
                f"server busy: {len(self._pending)} items queued (limit {self.limits.max_queue_items}); retry later"
            )
        loop = asyncio.get_running_loop()
        now = self.clock()
        futures = []
        request_work = 0.0
        for item, key in zip(inputs, keys):
            future = loop.create_future()
            futures.append(future)
            cached = self.cache.get(key) if self.cache.enabled and key not in self._inflight else None
            if cached is not None:
                future.set_result(cached)
                continue
            entry = self._inflight.get(key)
            if entry is not None:
                metrics.CACHE_MERGED.inc()
            else:
                entry = self._inflight[key] = QueueEntry(item, enqueued_at=now, key=key)
                request_work += entry.work
                entry.request_work = request_work
                self._pending.append(entry)
            entry.waiters.append(Waiter(future, deadline))
        self._wake.set()
        return futures

    # ---- running -------------------------------------------------------------------
    async def run_once(self, batch: list[QueueEntry], slot: WorkerSlot | None = None) -> None:
        """Run one batch on a worker thread and resolve its waiters."""
        slot = slot or self.slots[0]
        loop = self._loop_ref = asyncio.get_running_loop()
        inputs = [entry.input for entry in batch]
        started = time.perf_counter()
        slot.interleaved_seconds = 0.0
        metrics.WORKER_BUSY.inc()
        try:
            results = await loop.run_in_executor(
                slot.executor, lambda: slot.worker.run(inputs, between_layers=lambda: self._interleave(slot)))
            while not slot.interleaved.empty():  # put there after the batch's last layer
                await loop.run_in_executor(slot.executor, self._interleave, slot)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # DeviceUnusable, or the thread died (SystemExit...): never serve on
            stranded = []  # handed over for between its layers, never run
            while not slot.interleaved.empty():
                stranded += slot.interleaved.get_nowait()
            self._lose(f"{type(exc).__name__}: {exc}", [*batch, *stranded])
            raise WorkerLost(WORKER_LOST) from exc
        finally:
            metrics.WORKER_BUSY.dec()
        self._batch_done(batch, results, time.perf_counter() - started - slot.interleaved_seconds, slot)

    def _batch_done(self, batch: list[QueueEntry], results, seconds: float, slot: WorkerSlot) -> None:
        inputs = [entry.input for entry in batch]
        metrics.observe_batch(inputs, seconds)
        metrics.WORKER_BATCHES.labels(slot.name, slot.device).inc()
        metrics.WORKER_SECONDS.labels(slot.name, slot.device).inc(seconds)
        self.cost.observe(inputs, seconds)
        for entry, result in zip(batch, results):
            self._finish(entry, result)
        self._wake.set()

    def _interleave(self, slot: WorkerSlot) -> None:
        """On the worker thread, between two layers of its batch: run what the loop put there."""
        while True:
            try:
                batch = slot.interleaved.get_nowait()
            except queue.Empty:
                return
            started = time.perf_counter()
            try:
                results = slot.worker.run([entry.input for entry in batch])
            except BaseException:  # fail its items, then let the running batch see the error
                self._loop_ref.call_soon_threadsafe(self._fail, batch)
                raise
            seconds = time.perf_counter() - started
            slot.interleaved_seconds += seconds  # read by the loop once the running batch is done
            metrics.INTERLEAVED_BATCHES.inc()
            self._loop_ref.call_soon_threadsafe(self._batch_done, batch, results, seconds, slot)

    def _fail(self, batch: list[QueueEntry]) -> None:
        for entry in batch:
            self._finish(entry, Internal("scheduler failure; see the server log"))

    def _interleave_due_work(self) -> None:
        """Every worker is busy: hand work that is due before a long running batch to that
        batch's worker, to run between its layers."""
        for slot in self.slots:
            if not slot.busy or slot.running_seconds < INTERLEAVE_MIN_SECONDS:
                continue
            while self._pending:
                anchor = next_anchor(self._pending, self.limits, self.cost)
                if due(anchor, self.limits, self.cost) >= slot.running_due or \
                        self.cost.seconds(anchor) > INTERLEAVE_MAX_SHARE * slot.running_seconds:
                    break
                batch = take_batch(self._pending, self.limits, anchor)
                metrics.observe_queue_wait(batch, self.clock())
                slot.interleaved.put(batch)

    def _finish(self, entry: QueueEntry, result: ItemResult | ServiceError) -> None:
        if entry.key is not None and self._inflight.get(entry.key) is entry:
            del self._inflight[entry.key]
        if not isinstance(result, ServiceError):
            result = freeze(result)  # one result may go to many callers
            if entry.key is not None and self.cache.enabled:
                self.cache.put(entry.key, result)
        for waiter in entry.waiters:
            if waiter.future.done():  # cancelled while running
                continue
            if isinstance(result, ServiceError):
                waiter.future.set_exception(result)
            else:
                waiter.future.set_result(result)

    async def run_now(self, inputs: list[ModelInput], worker: int = 0) -> list[ItemResult]:
        """Run `inputs` as one batch on one worker, ahead of the queue and the cache (warm-up);
        raises the first item's error."""
        loop = asyncio.get_running_loop()
        batch = [QueueEntry(item, [Waiter(loop.create_future())]) for item in inputs]
        await self.run_once(batch, self.slots[worker])
        return [entry.waiters[0].future.result() for entry in batch]

    async def _dispatch(self, batch: list[QueueEntry], slot: WorkerSlot) -> None:
        try:
            await self.run_once(batch, slot)
        except WorkerLost:  # run_once failed everything; the server is exiting
            pass
        except Exception:  # fail what it held; the worker and the loop keep serving
            log.exception("scheduler failure on worker %s", slot.name)
            self._fail(batch)
        finally:
            slot.busy = False
            self._wake.set()

    def _drop_dead(self) -> None:
        now = self.clock()
        alive = []
        for entry in self._pending:
            waiting = []
            for waiter in entry.waiters:
                if waiter.future.done():
                    metrics.DROPPED.labels("cancelled").inc()
                elif waiter.deadline is not None and now >= waiter.deadline:
                    metrics.DROPPED.labels("deadline").inc()
                    waiter.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                else:
                    waiting.append(waiter)
            entry.waiters = waiting
            if waiting:
                alive.append(entry)
            elif entry.key is not None and self._inflight.get(entry.key) is entry:
                del self._inflight[entry.key]
        self._pending[:] = alive

    def _batch_is_full(self, anchor: QueueEntry) -> bool:
        same = [it for it in self._pending if it.batch_key == anchor.batch_key]
        width = max(it.length for it in same)
        return (len(same) >= self.limits.max_batch_size or width * len(same) >= self.limits.max_batch_tokens
                or width * width * len(same) * (MAPS_FACTOR if anchor.input.needs_maps else 1)
                >= self.limits.max_batch_token_pairs)

    async def _fill_window(self) -> None:
        """Give concurrent callers a moment to join before an idle worker starts."""
        deadline = min(it.enqueued_at for it in self._pending) + self.limits.max_wait_s
        while self._pending and not self._batch_is_full(next_anchor(self._pending, self.limits, self.cost)):
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _idle_slot(self) -> WorkerSlot | None:
        return next((slot for slot in self.slots if not slot.busy), None)

    async def _loop(self) -> None:
        while self.lost is None:
            batch: list[QueueEntry] = []
            try:
                self._drop_dead()
                if self._pending and self._idle_slot() is None:
                    self._interleave_due_work()
                if not self._pending or self._idle_slot() is None:
                    if self._closing and not self._pending:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._fill_window()
                self._drop_dead()
                slot = self._idle_slot()
                if not self._pending or slot is None:
                    continue
                batch = take_batch(self._pending, self.limits, next_anchor(self._pending, self.limits, self.cost))
                metrics.observe_queue_wait(batch, self.clock())
                slot.busy = True
                slot.running_due = min(due(entry, self.limits, self.cost) for entry in batch)
                slot.running_seconds = self.cost.batch_seconds(batch)
                task = asyncio.get_running_loop().create_task(self._dispatch(batch, slot))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            except Exception:  # the loop must survive anything: fail what it held, keep serving
                log.exception("scheduler failure")
                held = batch or self._pending[:]
                if not batch:
                    self._pending.clear()
                for entry in held:
                    self._finish(entry, Internal("scheduler failure; see the server log"))

    async def close(self) -> None:
        """Finish everything queued and running, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        while self._running:
            await asyncio.gather(*list(self._running))
        for slot in self.slots:
            slot.executor.shutdown(wait=True)
