"""Routes each model's work to that model's own scheduler.

Every served model has its own worker (device, precision, attention mode) and scheduler
(batch budget, queue bound), so a slow model on one device never holds up another's
queue. The router has the scheduler's interface, so the servicer needs no model map.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from esm2_wire.item_result import ItemResult
from service import metrics
from service.engine.inputs import ModelInput
from service.engine.scheduler import Scheduler
from service.request_context import RequestContext


class ModelRouter:
    def __init__(self, schedulers: dict[str, Scheduler]):
        self.schedulers = schedulers
        # One server-wide gauge over every model's queue, read when scraped.
        metrics.QUEUE_DEPTH.set_function(lambda: sum(s.queued_items for s in schedulers.values()))

    def submit(self, inputs: list[ModelInput], deadline: float | None = None,
               request: RequestContext | None = None, alternative: str = "") -> list[asyncio.Future]:
        """All inputs of one request belong to one model (the servicer builds them so)."""
        return self.schedulers[inputs[0].model].submit(inputs, deadline, request, alternative)

    async def run_now(self, inputs: list[ModelInput], worker: int = 0) -> list[ItemResult]:
        return await self.schedulers[inputs[0].model].run_now(inputs, worker)

    @property
    def lost(self) -> str | None:
        """Why a model's worker is gone, if one is; the server then stops as a whole."""
        return next((s.lost for s in self.schedulers.values() if s.lost is not None), None)

    def on_lost(self, callback: Callable[[str], None]) -> None:
        for scheduler in self.schedulers.values():
            scheduler.on_lost = callback

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def close(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.close()
