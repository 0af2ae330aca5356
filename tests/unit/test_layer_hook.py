"""The narrow hook between the forward pass and scheduling: the real ModelWorker over a
random-weight checkpoint (loaded through the real loader) calls its layer hook between every two
layers, and the real Interleaver runs a batch of another length there whose results, and the
running batch's, equal those of each batch run alone (fair-esm's rotary cache is module state
that a nested batch must not disturb)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import model_input

from service.engine.dispatch import Batch, BatchDone, Interleaver
from service.engine.intake import QueueEntry
from service.engine.worker import ModelWorker
from service.models.checkpoints import load
from service.models.random_checkpoints import write_random_checkpoint


class CountingHook:
    calls = 0

    def between_layers(self) -> None:
        self.calls += 1


def _tokens(length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([[0], rng.integers(4, 24, length - 2), [2]]).astype(np.int64)  # BOS, residues, EOS


LAST_LAYER = 6  # of the 8M shape: asking for it runs every layer (a pass stops at its deepest layer asked for)


def _input(length: int, seed: int):
    item = model_input(length)
    return item.__class__(item.model, _tokens(length, seed), item.outputs, (LAST_LAYER,))


def _same(a, b) -> bool:
    return all(np.array_equal(a.mean[layer], b.mean[layer]) for layer in a.mean) and a.mean.keys() == b.mean.keys()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint("8m", tmp_path_factory.mktemp("layer-hook"), seed=3)


@pytest.mark.parametrize("fast_attention", [True, False])
def test_a_batch_run_between_another_batchs_layers_leaves_both_results_unchanged(checkpoint, fast_attention):
    loaded = load("m", checkpoint)
    worker = ModelWorker({"m": loaded}, torch.device("cpu"), fast_attention=fast_attention)
    running, between = [_input(40, 1), _input(37, 2)], [_input(13, 3)]
    alone_running, alone_between = worker.run(running), worker.run(between)
    worker.layer_hook = counting = CountingHook()
    worker.run(running)
    assert counting.calls == loaded.num_layers - 1  # between every two layers

    interleaver = Interleaver(worker)
    reported: list[BatchDone] = []
    interleaver.attach(lambda callback, arg: callback(arg), reported.append, lambda batch: None)
    worker.layer_hook = interleaver  # as a worker slot sets it
    interleaver.hand_over(Batch([QueueEntry(item) for item in between]))
    results = worker.run(running)

    assert not interleaver.has_work() and len(reported) == 1 and interleaver.seconds > 0  # ran once, no nesting
    assert all(map(_same, results, alone_running))
    assert all(map(_same, reported[0].results, alone_between))


def test_batches_handed_over_after_the_last_layer_run_one_after_another(checkpoint):
    worker = ModelWorker({"m": load("m", checkpoint)}, torch.device("cpu"))
    interleaver = Interleaver(worker)
    reported: list[BatchDone] = []
    interleaver.attach(lambda callback, arg: callback(arg), reported.append, lambda batch: None)
    worker.layer_hook = interleaver
    first, second = Batch([QueueEntry(_input(20, 4))]), Batch([QueueEntry(_input(30, 5))])
    interleaver.hand_over(first)
    interleaver.hand_over(second)
    interleaver.run_handed_over()  # as dispatch does once the running batch has ended
    assert [done.batch for done in reported] == [first, second]  # the second did not run inside the first
