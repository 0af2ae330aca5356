"""Tenants, in-process: equal items of different API keys are neither merged nor answered from
each other's cache entries (issue 16, attack 5); one key's are, as before."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from fakes import FakeWorker, batch_lengths, busy, metric, model_input, run_on_fake_clock

from service.api.auth import Tenancy
from service.engine.result_cache import ResultCache, cache_key


def of(tenant: str, length: int = 40):
    return dataclasses.replace(model_input(length), tenant=tenant)


def test_equal_items_of_two_tenants_are_computed_twice_in_flight_and_in_cache():
    worker = FakeWorker(gate=threading.Event())
    merged_before, hits_before = metric("esm_cache_merged_total"), metric("esm_cache_hits_total")

    async def test(scheduler):
        blocker = scheduler.submit([model_input(10)])
        await busy(worker)
        queued = scheduler.submit([of("key-0"), of("key-1"), of("key-0")])  # the second key-0 merges
        worker.gate.set()
        await asyncio.gather(*blocker, *queued)
        cached = scheduler.submit([of("key-1"), of("key-0"), of("key-2")])  # hits, hits, computed afresh
        await asyncio.gather(*cached)

    run_on_fake_clock(test, worker, cache=ResultCache(1 << 20))
    assert batch_lengths(worker) == [[10], [40, 40], [40]]
    assert metric("esm_cache_merged_total") - merged_before == 1
    assert metric("esm_cache_hits_total") - hits_before == 2


def test_the_tenant_enters_the_cache_key():
    assert cache_key("s", of("key-0")) != cache_key("s", of("key-1"))
    assert cache_key("s", of("key-0")) == cache_key("s", of("key-0"))
    assert cache_key("s", of("")) != cache_key("s", of("key-0"))


def test_tenants_are_named_by_key_position_never_by_the_key():
    tenancy = Tenancy(["alpha-secret", "beta-secret"])
    assert tenancy.of([("authorization", "Token beta-secret")]) == "key-1"
    assert tenancy.of([("authorization", "Bearer alpha-secret")]) == "key-0"
    assert tenancy.of([]) == ""
    assert Tenancy([]).of([("authorization", "Token beta-secret")]) == ""  # no keys: one tenant
    assert Tenancy(["alpha-secret", "beta-secret"], shared=True).of([("authorization", "Token beta-secret")]) == ""
