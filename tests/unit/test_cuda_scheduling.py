"""Scheduling on a device that runs ahead of the host (issue 22; docs/gpus.md):
warm-up is not learned from, an out-of-memory error between another batch's layers waits for
that batch to end, cuBLAS allocation failures count as out of memory, and the scheduling
defaults follow the device type. The real ModelWorker and Interleaver over a random-weight
checkpoint; out of memory comes from the simulated CUDA device (tests/simulated_cuda.py)."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import FakeWorker, model_input, run_scheduler
from simulated_cuda import installed

from service import platforms
from service.config import ModelSettings
from service.engine.dispatch import Batch, BatchDone, Interleaver
from service.engine.intake import QueueEntry
from service.engine.policy import DEVICE_DEFAULTS
from service.engine.worker import ModelWorker
from service.platforms.base import is_out_of_memory
from service.models.checkpoints import load
from service.models.random_checkpoints import write_random_checkpoint


def test_warm_up_batches_teach_the_cost_model_nothing():
    worker = FakeWorker()

    async def test(scheduler):
        await scheduler.run_now([model_input(40)])
        learned_from_warm_up = dict(scheduler.cost.rates)
        await scheduler.submit([model_input(41)])[0]
        return learned_from_warm_up, dict(scheduler.cost.rates)

    after_warm_up, after_work = run_scheduler(test, worker)
    assert after_warm_up == {} and list(after_work) == [("m", False)]


def _input(length: int, seed: int):
    rng = np.random.default_rng(seed)
    item = model_input(length)
    tokens = np.concatenate([[0], rng.integers(4, 24, length - 2), [2]]).astype(np.int64)
    return item.__class__(item.model, tokens, item.outputs, item.layers)


def test_out_of_memory_between_layers_runs_again_after_the_running_batch(tmp_path):
    """The running batch fits; the one handed over does not fit beside it (the simulated CUDA
    device refuses more than 60 tokens). It is not halved between the layers: it runs once the
    running batch has ended, where the usual halving applies, and every item gets its own result."""
    loaded = load("m", write_random_checkpoint("tiny", tmp_path, seed=4))
    with installed(oom_above_tokens=60):  # the simulated CUDA device: more than 60 tokens do not fit
        worker = ModelWorker({"m": loaded}, platforms.resolve_devices("cuda")[0])
        handed = [_input(20, 1), _input(20, 2), _input(20, 3), _input(20, 4)]  # 80 tokens: two halves of 40
        alone = [worker.run([item])[0] for item in handed]
        interleaver = Interleaver(worker)
        reported: list[BatchDone] = []
        interleaver.attach(lambda callback, arg: callback(arg), reported.append, lambda batch: None)
        worker.layer_hook = interleaver
        interleaver.hand_over(Batch([QueueEntry(item) for item in handed]))

        running = worker.run([_input(30, 5)])
        assert running[0].mean and reported == [] and interleaver.has_work()  # deferred, not failed or split
        interleaver.run_handed_over()  # as dispatch does once the running batch has ended
    assert not interleaver.has_work() and len(reported) == 1
    for got, expected in zip(reported[0].results, alone):
        np.testing.assert_allclose(got.mean[1], expected.mean[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("message", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes",
])
def test_allocation_failures_of_cublas_and_cudnn_count_as_out_of_memory(message):
    assert is_out_of_memory(RuntimeError(message))
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))


def test_scheduling_defaults_follow_the_device_type_unless_set():
    settings = ModelSettings()
    cpu, cuda = settings.batch_limits(1024, "cpu"), settings.batch_limits(8192, "cuda")
    assert (cpu.min_padding_efficiency, cpu.max_batch_token_pairs) == (0.92, 2048 * 2048)
    assert (cuda.min_padding_efficiency, cuda.max_batch_token_pairs) == (0.75, 8192 * 1024)
    # A full CUDA budget of full-length rows fits the pair cap; the CPU's would not allow it.
    assert 8 * 1024 * 1024 <= cuda.max_batch_token_pairs and 8 * 1024 * 1024 > cpu.max_batch_token_pairs
    assert DEVICE_DEFAULTS["cuda"].seconds_per_work < DEVICE_DEFAULTS["cpu"].seconds_per_work
    given = ModelSettings(min_padding_efficiency=0.5, max_batch_token_pairs=1000).batch_limits(8192, "cuda")
    assert (given.min_padding_efficiency, given.max_batch_token_pairs) == (0.5, 1000)
