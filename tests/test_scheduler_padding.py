"""The scheduler keeps padding low: a batch only grows while real tokens stay >= the target share."""

import numpy as np
import torch

from service.model_worker import WorkItem
from service.scheduler import BatchLimits, take_batch


def _items(lengths):
    return [WorkItem("m", torch.zeros(n, dtype=torch.int64), frozenset({"mean"}), (1,), None, None, 0.0)
            for n in lengths]


def test_batch_stops_growing_before_padding_exceeds_the_target():
    pending = _items([300, 310, 200, 100, 305])
    batch = take_batch(pending, BatchLimits())
    # 200 would make it 1115 real of 4 x 310 = 1240 padded tokens (0.90 < 0.92).
    assert sorted(i.length for i in batch) == [300, 305, 310]
    assert sorted(i.length for i in pending) == [100, 200]


def test_without_a_padding_target_the_token_budget_alone_limits_the_batch():
    pending = _items([300, 310, 200, 100, 305])
    batch = take_batch(pending, BatchLimits(min_padding_efficiency=0.0))
    assert len(batch) == 5 and not pending


def test_every_formed_batch_meets_the_target_on_a_log_normal_mix():
    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(300), 0.6, 64), 30, 2048).astype(int)
    pending, limits = _items([n + 2 for n in lengths]), BatchLimits()
    while pending:
        batch = take_batch(pending, limits)
        width = max(i.length for i in batch)
        assert len(batch) == 1 or sum(i.length for i in batch) >= limits.min_padding_efficiency * width * len(batch)
        assert len(batch) == 1 or width * len(batch) <= limits.max_batch_tokens
