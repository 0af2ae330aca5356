"""The scheduling policy as pure functions (no loop, no model, no server): which entry anchors the
next batch, which queued entries form it, and the one batch budget that both take_batch and the
scheduler's fill window ("is the batch full yet?") read."""

import numpy as np
import pytest
from fakes import RATE, entries, entry
from hypothesis import given, settings
from hypothesis import strategies as st

from esm2_wire.output_kinds import OutputKind
from service.engine.inputs import ModelInput
from service.engine.intake import QueueEntry
from service.engine.policy import BatchLimits, CostModel, batch_is_full, next_anchor, take_batch


# ---- which entry anchors the next batch ------------------------------------------------
def test_short_work_is_due_before_long_work_that_arrived_shortly_before_it():
    cost = CostModel(learn=False, seconds_per_work=RATE)
    huge, small = entry(2050, enqueued_at=0.0), entry(50, enqueued_at=1.0)
    assert next_anchor([huge, small], BatchLimits(aging=4.0), cost) is small
    # Arriving after the huge one's due time (0 + 4 x 6.2 s), the small one waits its turn.
    late = entry(50, enqueued_at=30.0)
    assert next_anchor([huge, late], BatchLimits(aging=4.0), cost) is huge
    # aging 0 is first come, first served.
    assert next_anchor([huge, small], BatchLimits(aging=0.0), cost) is huge


def test_a_full_length_item_runs_alone_under_the_token_pair_budget():
    limits = BatchLimits(max_batch_tokens=8192, max_batch_token_pairs=2048 * 2048)
    pending = entries([2050, 2050, 2050])
    assert _lengths_of(take_batch(pending, limits)) == [2050]  # 3 x 2050 tokens would fit the token budget
    pending = entries([1024] * 5)
    assert _lengths_of(take_batch(pending, limits)) == [1024] * 4  # 4 x 1024^2 = 2048^2
    pending = entries([1024] * 2, maps=True)  # attention maps weigh 3x: one 1024-token item alone
    assert _lengths_of(take_batch(pending, limits)) == [1024]
    pending = entries([512] * 6, maps=True)
    assert _lengths_of(take_batch(pending, limits)) == [512] * 5  # 5 x 512^2 x 3 <= 2048^2 < 6 x ...


def _lengths_of(batch) -> list[int]:
    return [e.length for e in batch]


def test_take_batch_groups_similar_lengths_under_the_token_budget():
    pending = [entry(100), entry(500), entry(105), entry(98), entry(480), entry(110, model="other"),
               entry(101, maps=True)]
    limits = BatchLimits(max_batch_tokens=400, max_batch_size=8)
    batch = take_batch(pending, limits)
    # Anchored on the oldest (100); nearest lengths of the same model and mode; 4 x 105 > 400.
    assert sorted(i.length for i in batch) == [98, 100, 105]
    assert [i.length for i in pending] == [500, 480, 110, 101]


def test_take_batch_takes_an_oversized_item_alone_and_respects_max_size():
    pending = entries([5000, 10])
    assert [i.length for i in take_batch(pending, BatchLimits(max_batch_tokens=1000))] == [5000]
    pending = entries([10] * 10)
    assert len(take_batch(pending, BatchLimits(max_batch_tokens=10**6, max_batch_size=4))) == 4
    assert len(pending) == 6


def test_entries_batch_only_with_their_own_model_and_attention_mode():
    pending = [entry(50, model="a"), entry(50, model="b"), entry(50, model="a", maps=True), entry(50, model="a")]
    batch = take_batch(pending, BatchLimits())
    assert [(e.input.model, e.input.needs_maps) for e in batch] == [("a", False), ("a", False)]
    assert {e.batch_key for e in pending} == {("b", False), ("a", True)}


def test_batch_stops_growing_before_padding_exceeds_the_target():
    pending = entries([300, 310, 200, 100, 305])
    batch = take_batch(pending, BatchLimits())
    # 200 would make it 1115 real of 4 x 310 = 1240 padded tokens (0.90 < 0.92).
    assert sorted(i.length for i in batch) == [300, 305, 310]
    assert sorted(i.length for i in pending) == [100, 200]


def test_without_a_padding_target_the_token_budget_alone_limits_the_batch():
    pending = entries([300, 310, 200, 100, 305])
    batch = take_batch(pending, BatchLimits(min_padding_efficiency=0.0))
    assert len(batch) == 5 and not pending


def test_every_formed_batch_meets_the_target_on_a_log_normal_mix():
    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(300), 0.6, 64), 30, 2048).astype(int)
    pending, limits = entries([n + 2 for n in lengths]), BatchLimits()
    taken = 0
    while pending:
        batch = take_batch(pending, limits)
        taken += len(batch)
        width = max(i.length for i in batch)
        assert len(batch) == 1 or sum(i.length for i in batch) >= limits.min_padding_efficiency * width * len(batch)
        assert len(batch) == 1 or width * len(batch) <= limits.max_batch_tokens
    assert taken == len(lengths)


# ---- one budget, read by take_batch and by the fill window ----------------------------------
@pytest.mark.parametrize("lengths, maps, limits, taken", [
    ([10] * 4, False, BatchLimits(max_batch_size=4), 4),  # the size cap
    ([2048] * 5, False, BatchLimits(max_batch_tokens=4 * 2048, max_batch_token_pairs=10**9), 4),  # the token budget
    ([1024] * 5, False, BatchLimits(max_batch_token_pairs=4 * 1024 * 1024), 4),  # the pair budget
    ([512] * 6, True, BatchLimits(max_batch_token_pairs=5 * 512 * 512 * 3), 5),  # ... x 3 with maps
])
def test_a_queue_at_a_bound_is_full_and_take_batch_stops_at_that_bound(lengths, maps, limits, taken):
    pending = entries(lengths, maps=maps)
    at_bound = pending[:taken]
    assert batch_is_full(at_bound, at_bound[0], limits)
    assert not batch_is_full(at_bound[:-1], at_bound[0], limits)
    assert len(take_batch(pending, limits)) == taken


_queues = st.lists(st.integers(3, 1200), min_size=1, max_size=40)
_limits = st.builds(BatchLimits, max_batch_tokens=st.integers(1, 20_000), max_batch_size=st.integers(1, 50),
                    max_batch_token_pairs=st.integers(1, 3_000_000), min_padding_efficiency=st.just(0.0))


@settings(max_examples=300, deadline=None)
@given(lengths=_queues, maps=st.booleans(), limits=_limits)
def test_a_queue_the_fill_window_calls_not_full_is_taken_whole(lengths, maps, limits):
    """Waiting is only for a batch that could still grow: what is queued then fits as one batch."""
    pending = entries(lengths, maps=maps)
    anchor = next_anchor(pending, limits, CostModel(learn=False))
    if not batch_is_full(pending, anchor, limits):
        assert len(take_batch(pending, limits, anchor)) == len(lengths) and not pending


@settings(max_examples=300, deadline=None)
@given(lengths=_queues, maps=st.booleans(), limits=_limits)
def test_a_queue_the_fill_window_calls_full_cannot_grow_by_waiting(lengths, maps, limits):
    """Starting without waiting loses nothing: one more item as long as the longest queued would
    not join the batch of everything queued."""
    pending = entries(lengths, maps=maps)
    anchor = next_anchor(pending, limits, CostModel(learn=False))
    if batch_is_full(pending, anchor, limits):
        pending.append(entry(max(lengths), maps=maps))
        assert len(take_batch(pending, limits, anchor)) < len(lengths) + 1


# ---- depth (early exit) and the packed layout ------------------------------------------
def _at_depth(length: int, layer: int, num_layers: int = 33) -> QueueEntry:
    """An entry that asks for the mean of `layer` of a `num_layers`-layer model."""
    item = ModelInput("m", np.zeros(length, dtype=np.int64), frozenset({OutputKind.MEAN}), (layer,),
                      num_layers=num_layers)
    return QueueEntry(item)


def test_the_work_estimate_counts_only_the_layers_an_item_needs():
    shallow, deep = _at_depth(300, 6), _at_depth(300, 33)
    assert shallow.work == pytest.approx(deep.work * 7 / 34)  # 6 layers + embedding/head, of 33 + 1


def test_items_of_far_apart_depths_run_apart_and_near_depths_share():
    # Same lengths: only depth differs. Layer 6 with layer 33 would waste most of the pass.
    pending = [_at_depth(300, 6), _at_depth(300, 33), _at_depth(300, 6), _at_depth(300, 33)]
    first = take_batch(pending, BatchLimits())
    assert [e.input.layers for e in first] == [(6,), (6,)]
    assert [e.input.layers for e in take_batch(pending, BatchLimits())] == [(33,), (33,)]
    # Layers 32 and 33 (33/34 and 34/34 of a pass): the waste is under the padding target's.
    pending = [_at_depth(300, 32), _at_depth(300, 33)]
    assert len(take_batch(pending, BatchLimits())) == 2 and not pending


def test_depth_and_padding_waste_count_together():
    # 270 at layer 32 next to 300 at 33: 270*33 + 300*34 = 19110 useful of 2*300*34 = 20400 (0.937): shares.
    pending = [_at_depth(300, 33), _at_depth(270, 32)]
    assert len(take_batch(pending, BatchLimits())) == 2
    # 260 at layer 31: 260*32 + 300*34 = 18520 of 20400 (0.908 < 0.92): apart.
    pending = [_at_depth(300, 33), _at_depth(260, 31)]
    assert len(take_batch(pending, BatchLimits())) == 1 and len(pending) == 1


def test_packed_batches_fill_by_real_tokens_with_no_padding_rule():
    pending = entries([100, 300, 40, 200])  # anchored on 100, the oldest
    # Padded: 40 next to 100 would be 140 real of 200 padded (0.7), 200 next to it 300 of 400: alone.
    assert _lengths_of(take_batch(pending[:], BatchLimits(max_batch_tokens=400))) == [100]
    batch = take_batch(pending, BatchLimits(max_batch_tokens=400, packed=True))
    assert sorted(_lengths_of(batch)) == [40, 100, 200]  # 340 real tokens; + 300 would pass 400
    assert _lengths_of(pending) == [300]


def test_in_the_packed_layout_batches_that_make_attention_maps_are_planned_padded():
    """They run padded (the packed forward makes no maps), so the padding rule and padded token
    budget still hold for them."""
    limits = BatchLimits(max_batch_tokens=400, packed=True)
    pending = entries([100, 300, 40, 200], maps=True)
    assert _lengths_of(take_batch(pending, limits)) == [100]  # as padded: 40 or 200 beside it waste too much
    pending = entries([40, 300], maps=True)
    assert batch_is_full(pending, pending[0], BatchLimits(max_batch_tokens=600, packed=True))


def test_packed_batches_still_keep_far_apart_depths_apart():
    pending = [_at_depth(300, 6), _at_depth(300, 33), _at_depth(100, 6)]
    batch = take_batch(pending, BatchLimits(packed=True))
    assert sorted(e.input.layers for e in batch) == [(6,), (6,)] and [e.input.layers for e in pending] == [(33,)]


def test_the_fill_window_counts_real_tokens_when_batches_run_packed():
    # 40 + 300 real tokens: padded to 300 they fill a 600-token budget, packed they leave room.
    pending = entries([40, 300])
    assert batch_is_full(pending, pending[0], BatchLimits(max_batch_tokens=600))
    assert not batch_is_full(pending, pending[0], BatchLimits(max_batch_tokens=600, packed=True))
