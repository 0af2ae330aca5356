"""Routes each model's work to that model's own scheduler.

Every served model has its own worker (device, precision, attention mode) and scheduler
(batch budget, queue bound), so a slow model on one device never holds up another's
queue. The router has the scheduler's interface, so the servicer needs no model map.
"""

from __future__ import annotations

import asyncio

from esm2_wire.item_result import ItemResult
from service.model_worker import ModelInput
from service.scheduler import Scheduler


class ModelRouter:
    def __init__(self, schedulers: dict[str, Scheduler]):
        self.schedulers = schedulers

    def submit(self, inputs: list[ModelInput], deadline: float | None = None) -> list[asyncio.Future]:
        """All inputs of one request belong to one model (the servicer builds them so)."""
        return self.schedulers[inputs[0].model].submit(inputs, deadline)

    async def run_now(self, inputs: list[ModelInput]) -> list[ItemResult]:
        return await self.schedulers[inputs[0].model].run_now(inputs)

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def close(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.close()
