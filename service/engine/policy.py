"""The scheduling policy, as pure functions over queue entries: no loop, no thread, no clock of
its own (times come in as arguments), so tests drive it with a fake clock.

Which entry anchors the next batch: the one due first, where an entry is due at its arrival
plus `aging` times the estimated run time of its request's entries up to it. Short work
overtakes long work that arrived shortly before it, so a small request is not stuck behind a
huge one for the huge one's whole run; long work is never starved, since everything that
arrives after its due time is due after it.

A batch holds entries of one model and one attention mode (entries that need attention maps
take the slower exact path, so they are not mixed with the rest), of similar lengths, under a
padded-token budget, a padded-token-pair budget (the attention's quadratic work, so that a
full-length sequence runs alone) and a size cap. `budget_uses` states that budget once; both
"may this batch grow" (`take_batch`) and "is the queue's batch already full" (the scheduler's
fill window) read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # entries are built by the intake; the policy only reads them
    from service.engine.inputs import ModelInput
    from service.engine.intake import QueueEntry

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


@dataclass(frozen=True)
class DeviceDefaults:
    """The scheduling defaults that depend on the device type, as the batch budget does
    (service.models.batch_budget.DEVICE_DEFAULTS); a setting given explicitly wins."""

    min_padding_efficiency: float
    max_batch_token_pairs: int
    seconds_per_work: float  # the cost model's rate until a model's first batch is measured


# CPU: measured on the 2-core CPU (BENCHMARKS.md). CUDA: reasoned, not measured yet (README,
# "Running on GPUs"): a GPU runs a batch in nearly the same time up to its token budget (it is
# underfilled below), so padding costs little there and a lower floor lets batches reach the
# 8,192-token budget; fused attention (SDPA) makes the quadratic term cheap beside the Linear
# layers, so the pair cap admits a full budget of full-length rows (8 x 1024^2); the initial
# rate is about a 650M forward at 40% of an H100's bf16 matmul rate.
DEVICE_DEFAULTS = {
    "cpu": DeviceDefaults(min_padding_efficiency=0.92, max_batch_token_pairs=2048 * 2048,
                          seconds_per_work=INITIAL_SECONDS_PER_WORK),
    "cuda": DeviceDefaults(min_padding_efficiency=0.75, max_batch_token_pairs=8192 * 1024, seconds_per_work=1e-6),
}


def device_defaults(device_type: str) -> DeviceDefaults:
    """The defaults of a device type (an unknown type gets the CPU's: its only measured ones)."""
    return DEVICE_DEFAULTS.get(device_type, DEVICE_DEFAULTS["cpu"])


def work(length: int, needs_maps: bool, count: int = 1) -> float:
    """Estimated work of `count` rows of `length` tokens (padding included)."""
    return count * length * (1 + length / QUADRATIC_TOKENS) * (MAPS_FACTOR if needs_maps else 1.0)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 8192  # padded tokens (batch size x longest item)
    max_batch_size: int = 64
    max_wait_s: float = 0.005  # how long an idle worker waits to fill a batch
    max_queue_items: int = 4096  # a Score request queues all its passes at once (--max-score-passes)
    min_padding_efficiency: float = 0.92  # real tokens / padded tokens a batch may not fall below
    # batch size x longest item squared (x MAPS_FACTOR when the batch makes attention maps): the
    # attention's work; an item over it runs alone
    max_batch_token_pairs: int = 2048 * 2048
    aging: float = 4.0  # an item is due at arrival + aging x its estimated run time


def budget_uses(rows: int, width: int, needs_maps: bool, limits: BatchLimits) -> tuple[tuple[float, int], ...]:
    """The batch budget, written once: for each bound, (what a batch of `rows` rows padded to
    `width` tokens uses of it, the bound)."""
    pair_weight = MAPS_FACTOR if needs_maps else 1.0
    return ((rows, limits.max_batch_size),
            (width * rows, limits.max_batch_tokens),
            (width * width * rows * pair_weight, limits.max_batch_token_pairs))


def fits_budget(rows: int, width: int, needs_maps: bool, limits: BatchLimits) -> bool:
    """A batch of this shape stays within every bound."""
    return all(use <= bound for use, bound in budget_uses(rows, width, needs_maps, limits))


def fills_budget(rows: int, width: int, needs_maps: bool, limits: BatchLimits) -> bool:
    """A batch of this shape reaches a bound: one more row of this width could not join it, so
    waiting for more work gains nothing."""
    return any(use >= bound for use, bound in budget_uses(rows, width, needs_maps, limits))


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
        return self.rate(*batch[0].batch_key) * work(max(e.length for e in batch), batch[0].input.needs_maps,
                                                     len(batch))

    def observe(self, batch: list[ModelInput], seconds: float) -> None:
        if not self.learn:
            return
        key = batch[0].model, batch[0].needs_maps
        rate = seconds / work(max(item.length for item in batch), batch[0].needs_maps, len(batch))
        old = self.rates.get(key)
        self.rates[key] = rate if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate


def due(entry: QueueEntry, limits: BatchLimits, cost: CostModel) -> float:
    """Arrival + aging x the estimated run time of its request's work up to this entry."""
    return entry.enqueued_at + limits.aging * entry.work_until_done * cost.rate(*entry.batch_key)


def next_anchor(pending: list[QueueEntry], limits: BatchLimits, cost: CostModel) -> QueueEntry:
    """The entry due first (the oldest among equals)."""
    return min(pending, key=lambda entry: due(entry, limits, cost))


def batch_is_full(pending: list[QueueEntry], anchor: QueueEntry, limits: BatchLimits) -> bool:
    """Every queued peer of `anchor`, padded to the longest, already reaches a bound."""
    same = [it for it in pending if it.batch_key == anchor.batch_key]
    return fills_budget(len(same), max(it.length for it in same), anchor.input.needs_maps, limits)


def runs_between_layers(anchor: QueueEntry, running_due: float, running_seconds: float,
                        limits: BatchLimits, cost: CostModel) -> bool:
    """`anchor` may run between the layers of a running batch: the batch is long, the anchor is
    due before it, and short beside it."""
    return (running_seconds >= INTERLEAVE_MIN_SECONDS
            and due(anchor, limits, cost) < running_due
            and cost.seconds(anchor) <= INTERLEAVE_MAX_SHARE * running_seconds)


def take_batch(pending: list[QueueEntry], limits: BatchLimits, anchor: QueueEntry | None = None) -> list[QueueEntry]:
    """Remove and return the next batch: `anchor` (default: the oldest entry) plus its nearest-length peers."""
    anchor = pending[0] if anchor is None else anchor
    peers = sorted((it for it in pending if it.batch_key == anchor.batch_key), key=lambda it: it.length)
    lo = hi = peers.index(anchor)
    width = real = anchor.length  # real: tokens that are not padding
    needs_maps = anchor.input.needs_maps

    while True:
        count = hi - lo + 2
        # Each neighbour that keeps the batch within budget and padding target, with the padding it adds:
        # a shorter item pads itself; a longer one widens every row. On CPU a batch of a few
        # hundred tokens already runs near full speed, so padding is pure waste.
        options = []
        if lo > 0:
            shorter = peers[lo - 1]
            if fits_budget(count, width, needs_maps, limits) and \
                    real + shorter.length >= limits.min_padding_efficiency * width * count:
                options.append((width - shorter.length, -1))
        if hi + 1 < len(peers):
            longer = peers[hi + 1]
            if fits_budget(count, longer.length, needs_maps, limits) and \
                    real + longer.length >= limits.min_padding_efficiency * longer.length * count:
                options.append(((longer.length - width) * (count - 1), 1))
        if not options:
            break
        if min(options)[1] < 0:
            lo -= 1
            real += peers[lo].length
        else:
            hi += 1
            width = peers[hi].length
            real += width
    batch = peers[lo : hi + 1]
    chosen = set(map(id, batch))
    pending[:] = [it for it in pending if id(it) not in chosen]
    return batch
