"""Routes each model's work to that model's own scheduler.

Every served model has its own worker (device, precision, attention mode) and scheduler
(batch budget, queue bound), so a slow model on one device never holds up another's
queue. The router has the scheduler's interface, so the servicer needs no model map.
"""

from __future__ import annotations

from service.model_worker import WorkItem
from service.scheduler import Scheduler


class ModelRouter:
    def __init__(self, schedulers: dict[str, Scheduler]):
        self.schedulers = schedulers

    def submit(self, items: list[WorkItem]) -> None:
        """All items of one request belong to one model (the servicer builds them so)."""
        self.schedulers[items[0].model].submit(items)

    async def run_once(self, batch: list[WorkItem]) -> None:
        await self.schedulers[batch[0].model].run_once(batch)

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def close(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.close()
