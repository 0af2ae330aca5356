"""ResultCache: keys that change with everything a result depends on, and a byte bound that holds."""

from __future__ import annotations

import numpy as np
from fakes import model_input

from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from service.engine.inputs import ModelInput
from service.engine.result_cache import ResultCache, cache_key, result_bytes


def _result(floats: int) -> ItemResult:
    return ItemResult(mean={1: np.zeros(floats, np.float32)})


def test_the_key_changes_with_scope_tokens_outputs_and_layers():
    base = ModelInput("m", np.array([0, 5, 6, 2], dtype=np.int64), frozenset({OutputKind.MEAN}), (1,))
    variants = [
        ModelInput("m", np.array([0, 5, 7, 2], dtype=np.int64), base.outputs, base.layers),
        ModelInput("m", base.token_ids, frozenset({OutputKind.MEAN, OutputKind.LOGITS}), base.layers),
        ModelInput("m", base.token_ids, base.outputs, (1, 2)),
    ]
    keys = {cache_key("m|w|fp32", base)} | {cache_key("m|w|fp32", v) for v in variants}
    keys |= {cache_key("m|w|bf16", base), cache_key("m|other-weights|fp32", base)}
    assert len(keys) == 6
    same = ModelInput("m", np.array([0, 5, 6, 2], dtype=np.int64), frozenset({OutputKind.MEAN}), (1,))
    assert cache_key("m|w|fp32", same) == cache_key("m|w|fp32", base)


def test_eviction_keeps_the_byte_bound_and_drops_the_least_recently_used():
    cache = ResultCache(max_bytes=1000)
    keys = [cache_key("s", model_input(10, token=n)) for n in range(5)]
    for key in keys[:2]:
        cache.put(key, _result(60))  # 240 bytes each
    assert cache.get(keys[0]) is not None  # now the most recently used
    for key in keys[2:]:
        cache.put(key, _result(60))
        assert cache.bytes <= 1000
    assert cache.bytes == sum(result_bytes(_result(60)) for _ in range(4)) == 960
    assert not cache.contains(keys[1]) and cache.contains(keys[0])
    cache.put(keys[1], _result(60))
    assert cache.bytes <= 1000 and len(cache) == 4 and not cache.contains(keys[0])  # now the least recent


def test_a_result_bigger_than_a_quarter_of_the_cache_is_not_kept():
    cache = ResultCache(max_bytes=1000)
    cache.put(b"k", _result(100))  # 400 bytes
    assert not cache.contains(b"k") and cache.bytes == 0
