"""Content-addressed cache of item results, bounded in bytes (least recently used goes first).

A result depends only on the model (its weights, precision and attention mode: the
server's `scope` string for that model), the token ids, the outputs and the layers, so
those, hashed, are the key, with the item's tenant: a hit answers in a millisecond where a
miss takes the model's time, so a cache shared across tenants tells each whether another
asked the same (see ModelInput.tenant). Cached results are shared by every caller that hits
them, so their arrays are made read-only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from esm2_wire.item_result import ItemResult
from service import metrics
from service.engine.inputs import ModelInput

DEFAULT_CACHE_MB = 512
# One result may take at most this share of the cache, so that a few huge per-token or
# attention results never flush everything else.
LARGEST_ENTRY_SHARE = 0.25


def cache_key(scope: str, item: ModelInput) -> bytes:
    """The identity of `item`'s result: equal keys, equal results."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(scope.encode())
    digest.update(b"\0tenant:" + item.tenant.encode())
    digest.update(b"\0outputs:" + ",".join(sorted(kind.value for kind in item.outputs)).encode())
    digest.update(b"\0layers:" + ",".join(map(str, item.layers)).encode())
    digest.update(b"\0tokens:" + item.token_ids.astype(np.int64).tobytes())
    return digest.digest()


def _arrays(result: ItemResult):
    for per_layer in (result.mean, result.bos, result.per_token):
        yield from per_layer.values()
    for array in (result.logits, result.contacts, result.attentions):
        if array is not None:
            yield array


def result_bytes(result: ItemResult) -> int:
    return sum(array.nbytes for array in _arrays(result))


def freeze(result: ItemResult) -> ItemResult:
    """Make the result's arrays read-only: one result may be handed to many callers."""
    for array in _arrays(result):
        array.flags.writeable = False
    return result


class ResultCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[ItemResult, int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, key: bytes) -> bool:
        """Whether `key` is cached (no effect on recency or metrics)."""
        return key in self._entries

    def get(self, key: bytes) -> ItemResult | None:
        found = self._entries.get(key)
        if found is None:
            metrics.CACHE_MISSES.inc()
            return None
        self._entries.move_to_end(key)
        metrics.CACHE_HITS.inc()
        return found[0]

    def put(self, key: bytes, result: ItemResult) -> None:
        size = result_bytes(result)
        if size > self.max_bytes * LARGEST_ENTRY_SHARE or key in self._entries:
            return
        self._entries[key] = (result, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
            metrics.CACHE_EVICTIONS.inc()
        metrics.CACHE_BYTES.set(self.bytes)
        metrics.CACHE_ENTRIES.set(len(self._entries))
