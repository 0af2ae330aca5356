"""ModelRouter: each model's work goes to its own scheduler, and the queue gauge counts them all."""

from __future__ import annotations

import asyncio
import threading

from fakes import FakeWorker, busy, model_input

from service import metrics
from service.engine.router import ModelRouter
from service.engine.policy import BatchLimits
from service.engine.scheduler import Scheduler


def test_each_model_runs_on_its_own_worker_and_the_queue_gauge_sums_every_model():
    workers = {"a": FakeWorker(gate=threading.Event()), "b": FakeWorker(gate=threading.Event())}

    async def main():
        router = ModelRouter({name: Scheduler(w, BatchLimits(max_wait_s=0.0)) for name, w in workers.items()})
        router.start()
        try:
            running = [*router.submit([model_input(10, "a")]), *router.submit([model_input(10, "b")])]
            await busy(workers["a"])
            await busy(workers["b"])
            queued = [*router.submit([model_input(n, "a") for n in (20, 21)]),
                      *router.submit([model_input(n, "b") for n in (30, 31, 32)])]
            depth = metrics.QUEUE_DEPTH.collect()[0].samples[0].value
            for worker in workers.values():
                worker.gate.set()
            results = await asyncio.gather(*running, *queued)
            return depth, [float(r.mean[1][0]) for r in results]
        finally:
            for worker in workers.values():
                worker.gate.set()
            await asyncio.wait_for(router.close(), 30)

    depth, results = asyncio.run(main())
    assert depth == 5  # 2 of model a and 3 of model b, not whichever scheduler wrote last
    assert results == [10, 10, 20, 21, 30, 31, 32]
    assert [[i.model for i in b] for b in workers["a"].batches] == [["a"], ["a", "a"]]
    assert [[i.model for i in b] for b in workers["b"].batches] == [["b"], ["b", "b", "b"]]
