"""The scheduling policy, as pure functions over queue entries: no loop, no thread, no clock of
its own (times come in as arguments), so tests drive it with a fake clock.

Which entry anchors the next batch: the one due first, where an entry is due at its arrival
plus `aging` times the estimated run time of its request's entries up to it. Short work
overtakes long work that arrived shortly before it, so a small request is not stuck behind a
huge one for the huge one's whole run; long work is never starved, since everything that
arrives after its due time is due after it.

A batch holds entries of one model and one attention mode (entries that need attention maps
take the slower exact path, so they are not mixed with the rest), of similar lengths and depths,
under a padded-token budget (real tokens when the worker runs batches packed), a padded-token-pair budget (the attention's quadratic work, so that a
full-length sequence runs alone) and a size cap. `budget_uses` states that budget once; both
"may this batch grow" (`take_batch`) and "is the queue's batch already full" (the scheduler's
fill window) read it.

Depth: an entry that asks only for representations up to layer k needs k layers, not all (the
forward stops at the batch's deepest item), and its work estimate says so. Entries of different
depths share a batch only where that wastes little: a batch grows only while its useful work
(each entry's tokens x its layers) stays at least `min_padding_efficiency` of the work it
computes (rows x longest entry x deepest entry; packed: real tokens x deepest entry). On CPU a
batch of a few hundred tokens already runs near full speed, so running entries apart costs
nothing but the waste they would add: the bound that limits padding limits depth waste too.
(So a layer-6 and a layer-33 request run apart; layers 32 and 33 may share.)
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from service.engine.inputs import ModelInput


class Entry(Protocol):
    """What the policy reads of a queued item. service.engine.intake.QueueEntry is one; the
    policy names only this, so that the intake depends on the policy and not the other way."""

    input: ModelInput
    enqueued_at: float

    @property
    def length(self) -> int: ...

    @property
    def work(self) -> float: ...

    @property
    def batch_key(self) -> tuple[str, bool]: ...

    @property
    def work_until_done(self) -> float: ...

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


# CPU: measured on the 2-core CPU (BENCHMARKS.md). CUDA: reasoned, not measured yet (docs/gpus.md):
# a GPU runs a batch in nearly the same time up to its token budget (it is
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


def work(length: int, needs_maps: bool, count: int = 1, depth_share: float = 1.0) -> float:
    """Estimated work of `count` rows of `length` tokens (padding included), through
    `depth_share` of the model's layers (ModelInput.depth_share)."""
    return count * length * (1 + length / QUADRATIC_TOKENS) * (MAPS_FACTOR if needs_maps else 1.0) * depth_share


def batch_work(batch: list[ModelInput]) -> float:
    """Estimated work of a batch: every row as wide as its longest item, as deep as its deepest."""
    return work(max(item.length for item in batch), batch[0].needs_maps, len(batch),
                max(item.depth_share for item in batch))


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 8192  # padded tokens (batch size x longest item)
    max_batch_size: int = 64
    max_wait_s: float = 0.005  # how long an idle worker waits to fill a batch
    max_queue_items: int = 4096  # a Score request queues all its passes at once (--max-score-passes)
    # Estimated work (policy.work units) queued for the model, a request's own new work included:
    # 2^24 holds the largest Score request (2,048 passes of 2,048 residues, 12.6M units) alone.
    max_queue_work: float = float(1 << 24)
    min_padding_efficiency: float = 0.92  # real tokens / padded tokens a batch may not fall below
    # batch size x longest item squared (x MAPS_FACTOR when the batch makes attention maps): the
    # attention's work; an item over it runs alone
    max_batch_token_pairs: int = 2048 * 2048
    aging: float = 4.0  # an item is due at arrival + aging x its estimated run time
    # The worker runs batches unpadded (service.models.packed): max_batch_tokens counts real tokens,
    # and the efficiency bound sees no padding, only layers an entry did not ask for. Batches that
    # make attention maps run padded whatever the layout (runs_packed), and are planned as padded.
    packed: bool = False


def runs_packed(needs_maps: bool, packed_layout: bool) -> bool:
    """Whether a batch runs unpadded: in the packed layout, unless it makes attention maps. The
    scheduler plans batches by it and the worker runs them by it."""
    return packed_layout and not needs_maps


def budget_uses(rows: int, width: int, tokens: int, needs_maps: bool,
                limits: BatchLimits) -> tuple[tuple[float, int], ...]:
    """The batch budget, written once: for each bound, (what a batch of `rows` rows of `tokens`
    real tokens, padded to `width` tokens, uses of it, the bound). The token bound counts padded
    tokens, or real ones where the batch runs packed (runs_packed)."""
    pair_weight = MAPS_FACTOR if needs_maps else 1.0
    return ((rows, limits.max_batch_size),
            (tokens if runs_packed(needs_maps, limits.packed) else width * rows, limits.max_batch_tokens),
            (width * width * rows * pair_weight, limits.max_batch_token_pairs))


def fits_budget(rows: int, width: int, tokens: int, needs_maps: bool, limits: BatchLimits) -> bool:
    """A batch of this shape stays within every bound."""
    return all(use <= bound for use, bound in budget_uses(rows, width, tokens, needs_maps, limits))


def fills_budget(rows: int, width: int, tokens: int, needs_maps: bool, limits: BatchLimits) -> bool:
    """A batch of this shape reaches a bound: one more row of this width could not join it, so
    waiting for more work gains nothing."""
    return any(use >= bound for use, bound in budget_uses(rows, width, tokens, needs_maps, limits))


class CostModel:
    """Seconds of model work expected, per model and attention mode, measured from batches run."""

    def __init__(self, learn: bool = True, seconds_per_work: float = INITIAL_SECONDS_PER_WORK):
        self.learn = learn
        self.initial = seconds_per_work
        self.rates: dict[tuple[str, bool], float] = {}  # batch key -> seconds per work unit

    def rate(self, model: str, needs_maps: bool) -> float:
        return self.rates.get((model, needs_maps), self.initial)

    def seconds(self, entry: Entry) -> float:
        return entry.work * self.rate(*entry.batch_key)

    def batch_seconds(self, batch: list[Entry]) -> float:
        return self.rate(*batch[0].batch_key) * batch_work([entry.input for entry in batch])

    def observe(self, batch: list[ModelInput], seconds: float) -> None:
        if not self.learn:
            return
        key = batch[0].model, batch[0].needs_maps
        rate = seconds / batch_work(batch)
        old = self.rates.get(key)
        self.rates[key] = rate if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate


def due(entry: Entry, limits: BatchLimits, cost: CostModel) -> float:
    """Arrival + aging x the estimated run time of its request's work up to this entry."""
    return entry.enqueued_at + limits.aging * entry.work_until_done * cost.rate(*entry.batch_key)


def next_anchor(pending: list[Entry], limits: BatchLimits, cost: CostModel) -> Entry:
    """The entry due first (the oldest among equals)."""
    return min(pending, key=lambda entry: due(entry, limits, cost))


def batch_is_full(pending: list[Entry], anchor: Entry, limits: BatchLimits) -> bool:
    """Every queued peer of `anchor`, padded to the longest, already reaches a bound."""
    same = [it for it in pending if it.batch_key == anchor.batch_key]
    return fills_budget(len(same), max(it.length for it in same), sum(it.length for it in same),
                        anchor.input.needs_maps, limits)


def runs_between_layers(anchor: Entry, running_due: float, running_seconds: float,
                        limits: BatchLimits, cost: CostModel) -> bool:
    """`anchor` may run between the layers of a running batch: the batch is long, the anchor is
    due before it, and short beside it."""
    return (running_seconds >= INTERLEAVE_MIN_SECONDS
            and due(anchor, limits, cost) < running_due
            and cost.seconds(anchor) <= INTERLEAVE_MAX_SHARE * running_seconds)


def take_batch(pending: list[Entry], limits: BatchLimits, anchor: Entry | None = None) -> list[Entry]:
    """Remove and return the next batch: `anchor` (default: the oldest entry) plus its nearest peers
    in depth, then length."""
    anchor = pending[0] if anchor is None else anchor
    peers = sorted((it for it in pending if it.batch_key == anchor.batch_key),
                   key=lambda it: (it.input.depth_share, it.length))
    lo = hi = peers.index(anchor)
    width, depth, tokens = anchor.length, anchor.input.depth_share, anchor.length  # tokens: not padding
    useful = anchor.length * depth  # real tokens x the layers each entry needs
    needs_maps = anchor.input.needs_maps

    while True:
        count = hi - lo + 2
        # Each neighbour that keeps the batch within budget and efficiency target, with the waste it
        # leaves (computed work that is padding or layers an entry did not ask for): a shorter entry
        # pads itself; a longer one widens every row; a deeper one deepens every row. On CPU a batch
        # of a few hundred tokens already runs near full speed, so waste is all that sharing costs.
        options = []
        for side, neighbour in ((-1, peers[lo - 1] if lo > 0 else None),
                                (1, peers[hi + 1] if hi + 1 < len(peers) else None)):
            if neighbour is None:
                continue
            grown_width, grown_tokens = max(width, neighbour.length), tokens + neighbour.length
            grown_depth = max(depth, neighbour.input.depth_share)
            computed = (grown_tokens if runs_packed(needs_maps, limits.packed) else count * grown_width) * grown_depth
            grown_useful = useful + neighbour.length * neighbour.input.depth_share
            if fits_budget(count, grown_width, grown_tokens, needs_maps, limits) and \
                    grown_useful >= limits.min_padding_efficiency * computed:
                options.append((computed - grown_useful, side))
        if not options:
            break
        side = min(options)[1]
        if side < 0:
            lo -= 1
        else:
            hi += 1
        joined = peers[lo if side < 0 else hi]
        width, depth = max(width, joined.length), max(depth, joined.input.depth_share)
        useful += joined.length * joined.input.depth_share
        tokens += joined.length
    batch = peers[lo : hi + 1]
    chosen = set(map(id, batch))
    pending[:] = [it for it in pending if id(it) not in chosen]
    return batch


# ---- admission --------------------------------------------------------------------------------
# Before any model work, a request's time is estimated from the cost model's current rate for its
# model (and attention mode), counting what is queued ahead of it and what the workers are running;
# a request that cannot finish before its caller's deadline, or whose work does not fit the queue's
# work bound, is refused at once rather than accepted to time out later.
class Verdict(enum.Enum):
    ADMIT = "admit"
    TOO_MUCH_WORK = "too much work"  # its own work is over the work bound: never fits (split it)
    QUEUE_FULL = "queue full"  # with the work queued, over the work bound: retry later
    CANNOT_FINISH = "cannot finish"  # its own work alone runs past the deadline: retrying does not help
    BEHIND_QUEUE = "behind the queue"  # the work ahead of it makes it miss the deadline: retry later


@dataclass(frozen=True)
class Admission:
    """An admission decision and the figures it rests on, for the caller's message."""

    verdict: Verdict
    own_work: float  # this request's new work (cache hits and merges excluded), in work units
    queued_work: float  # every queued entry's work, in work units
    own_seconds: float  # this request's own work at the current rates, spread over the workers
    ahead_seconds: float  # queued work due before it and the running batches, spread over the workers
    deadline_s: float | None  # seconds left to the caller's deadline; None: none

    @property
    def seconds(self) -> float:
        """Estimated seconds until the request's last item is done."""
        return self.own_seconds + self.ahead_seconds

    @property
    def retry_after_s(self) -> int:
        """When a refused request could be admitted: once the excess over the deadline has drained
        (at least 1 s)."""
        if self.deadline_s is None:
            return 1
        return max(1, math.ceil(self.seconds - self.deadline_s))


def admit(new: list[ModelInput], pending: list[Entry], running_seconds: float, workers: int, now: float,
          deadline: float | None, limits: BatchLimits, cost: CostModel) -> Admission:
    """Whether a request whose new work is `new` may join the queue `pending` now (times on the
    scheduler's clock; `running_seconds`: the running batches' estimated time).

    The request's items are due by `aging` x its estimated time (as `due` computes); the queued
    entries due before that run before its last item. All of it, with the running batches, is spread
    over the model's `workers`, but the request's longest item runs on one worker whatever their
    number."""
    own_work = sum(work(item.length, item.needs_maps, depth_share=item.depth_share) for item in new)
    queued_work = sum(entry.work for entry in pending)
    item_seconds = [cost.rate(item.model, item.needs_maps) * work(item.length, item.needs_maps,
                                                                    depth_share=item.depth_share) for item in new]
    workers = max(1, workers)
    own_seconds = max(sum(item_seconds) / workers, max(item_seconds, default=0.0))
    last_due = now + limits.aging * sum(item_seconds)
    ahead = sum(cost.seconds(entry) for entry in pending if due(entry, limits, cost) <= last_due)
    ahead_seconds = (ahead + running_seconds) / workers
    remaining = None if deadline is None else deadline - now

    def decided(verdict: Verdict) -> Admission:
        return Admission(verdict, own_work, queued_work, own_seconds, ahead_seconds, remaining)

    if own_work > limits.max_queue_work:
        return decided(Verdict.TOO_MUCH_WORK)
    if remaining is not None and own_seconds > remaining:
        return decided(Verdict.CANNOT_FINISH)
    if queued_work + own_work > limits.max_queue_work:
        return decided(Verdict.QUEUE_FULL)
    if remaining is not None and own_seconds + ahead_seconds > remaining:
        return decided(Verdict.BEHIND_QUEUE)
    return decided(Verdict.ADMIT)
