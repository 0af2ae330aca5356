"""What waits for a batch: queue entries, each with every caller awaiting its result.

Identical items (same model, tokens, outputs, layers and tenant) are computed once: an item
equal to one queued or running joins it as one more waiter, and a finished result is kept in a
byte-bounded cache (service.engine.result_cache) that answers later equal items at once. Only
new work counts against the queue bound. Callers that cancelled or whose deadline passed are
dropped before a batch is formed; an entry nobody awaits any more never runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from esm2_wire.item_result import ItemResult
from service import metrics
from service.engine.inputs import ModelInput
from service.engine.policy import BatchLimits, work
from service.engine.result_cache import ResultCache, cache_key, freeze
from service.errors import DeadlineExceeded, QueueFull, ServiceError
from service.request_context import RequestContext


@dataclass(eq=False)
class Waiter:
    """One caller awaiting an entry's result."""

    future: asyncio.Future  # resolved with an ItemResult or a ServiceError
    deadline: float | None = None  # scheduler clock seconds
    request: RequestContext | None = None  # the caller's request, told when its item starts (queue wait, spans)


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


class Intake:
    """The queue of one scheduler: entries in arrival order (`pending`), and every entry queued
    or running by its cache key, so that equal items merge."""

    def __init__(self, limits: BatchLimits, cache: ResultCache, scopes: dict[str, str],
                 clock: Callable[[], float]):
        self.limits = limits
        self.cache = cache
        self.scopes = scopes  # model -> identity of its weights and numerics (cache keys)
        self.clock = clock
        self.pending: list[QueueEntry] = []
        self._inflight: dict[bytes, QueueEntry] = {}  # queued or running, by cache key

    def __len__(self) -> int:
        return len(self.pending)

    def _key(self, item: ModelInput) -> bytes:
        return cache_key(self.scopes.get(item.model, item.model), item)

    def submit(self, inputs: list[ModelInput], deadline: float | None = None,
               request: RequestContext | None = None,
               admit: Callable[[list[ModelInput]], None] | None = None) -> list[asyncio.Future]:
        """Queue all inputs of one request, or none of them; their futures, in order.

        Inputs already cached are answered at once; inputs equal to one queued or running
        (this request's own duplicates included) wait for it; only the rest are new work,
        and only new work counts against the queue bounds and `admit`, which raises to refuse
        the request before anything is queued."""
        keys = [self._key(item) for item in inputs]
        new = {k: item for item, k in zip(inputs, keys) if k not in self._inflight and not self.cache.contains(k)}
        if len(self.pending) + len(new) > self.limits.max_queue_items:
            metrics.REJECTED.inc()
            raise QueueFull(
                f"server busy: {len(self.pending)} items queued (limit {self.limits.max_queue_items}); retry later"
            )
        if admit is not None:
            admit(list(new.values()))
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
                self.pending.append(entry)
            entry.waiters.append(Waiter(future, deadline, request))
        return futures

    def finish(self, entry: QueueEntry, result: ItemResult | ServiceError) -> None:
        """Answer every caller still awaiting `entry`, and cache a result."""
        self._forget(entry)
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

    def fail(self, entries: list[QueueEntry], error: ServiceError) -> None:
        for entry in entries:
            self.finish(entry, error)

    def fail_queued(self, error: ServiceError) -> None:
        """Fail every queued entry with `error` and empty the queue."""
        queued = self.pending[:]
        self.pending.clear()  # in place: the scheduler's loop may hold this list
        self.fail(queued, error)

    def drop_dead(self) -> None:
        """Drop callers that cancelled or whose deadline passed, and entries nobody awaits."""
        now = self.clock()
        alive = []
        for entry in self.pending:
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
            else:
                self._forget(entry)
        self.pending[:] = alive

    def _forget(self, entry: QueueEntry) -> None:
        if entry.key is not None and self._inflight.get(entry.key) is entry:
            del self._inflight[entry.key]
