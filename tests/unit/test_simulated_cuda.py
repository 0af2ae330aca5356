"""The CUDA path on the simulated CUDA device (tests/simulated_cuda.py; docs/gpus.md): the real
ModelWorker, scheduler, batch sweep and memory check over CudaPlatform, with the device computing
on the CPU. Issue 26's defects each have a test here; every result is
compared with the same worker on the CPU, which the parity suites compare with fair-esm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import run_scheduler
from simulated_cuda import GIB, OOM_FORMS, installed
from torch.overrides import TorchFunctionMode

from esm2_wire.output_kinds import OutputKind
from service import platforms, server
from service.engine.inputs import ModelInput
from service.engine.worker import ModelWorker, replicate
from service.models import memory_budget
from service.models.checkpoints import load
from service.models.random_checkpoints import write_random_checkpoint
from service.platforms.cuda import CudaPlatform

EVERY = frozenset({OutputKind.MEAN, OutputKind.BOS, OutputKind.PER_TOKEN, OutputKind.LOGITS, OutputKind.CONTACTS,
                   OutputKind.ATTENTIONS})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("checkpoint"), seed=4)


def _inputs(lengths, seed: int = 0, outputs=frozenset({OutputKind.MEAN}), layers=(1, 2)) -> list[ModelInput]:
    rng = np.random.default_rng(seed)
    made = []
    for length in lengths:
        tokens = np.concatenate([[0], rng.integers(4, 24, length - 2), [2]]).astype(np.int64)
        made.append(ModelInput("m", tokens, frozenset(outputs), tuple(layers)))
    return made


def _on_cpu(checkpoint, batch, packed=False):
    """Each item alone on the CPU: what every simulated-device result must equal."""
    worker = ModelWorker({"m": load("m", checkpoint)}, torch.device("cpu"), packed=packed)
    return [worker.run([item])[0] for item in batch]


def _assert_same(got, expected):
    for g, e in zip(got, expected, strict=True):
        for kind in ("mean", "bos", "per_token"):
            assert getattr(g, kind).keys() == getattr(e, kind).keys()
            for layer, array in getattr(e, kind).items():
                np.testing.assert_allclose(getattr(g, kind)[layer], array, rtol=1e-5, atol=1e-5)
        for kind in ("logits", "contacts", "attentions"):
            if getattr(e, kind) is None:
                assert getattr(g, kind) is None
            else:
                np.testing.assert_allclose(getattr(g, kind), getattr(e, kind), rtol=1e-5, atol=1e-5)


def test_a_bare_cuda_device_binds_the_worker_thread_and_serves(checkpoint):
    """Defect 1: `--device cuda` became torch.device("cuda") and the worker thread's
    torch.cuda.set_device refused it (torch's validator wants an index), so every start died at
    warm-up. Now `cuda` is normalised to the current device, and the scheduler's worker thread
    binds to it and answers."""
    with installed(devices=2) as sim:
        with pytest.raises(ValueError, match="specified index"):
            sim.set_device(torch.device("cuda"))  # what main's bind_thread called
        device, = platforms.resolve_devices("cuda")
        assert device == torch.device("cuda", 0)
        worker = ModelWorker({"m": load("m", checkpoint)}, device)
        batch = _inputs([12, 30], seed=1)

        async def test(scheduler):
            return [await result for result in scheduler.submit(batch)]

        results = run_scheduler(test, worker)
        assert sim.set_devices == [0]  # once, on the worker's thread (the pool's initializer)
    _assert_same(results, _on_cpu(checkpoint, batch))


def test_device_names_are_normalised_once_and_checked_at_start_up():
    """Defect 6: `cuda` and `cuda:0` were two devices to the memory check, and `cuda:7` on a
    one-GPU host ended in a bare AssertionError. Now both name cuda:0 (so their models add up),
    and an index past the count is a start-up error naming --device."""
    with pytest.raises(platforms.DeviceUnavailable, match="--device cuda: CUDA is not available"):
        platforms.resolve_devices("cuda")  # torch.cuda itself on this CPU machine
    with installed(devices=2) as sim:
        sim.set_device(1)  # `cuda` is the current device, as torch.device("cuda") means on a GPU
        assert platforms.resolve_devices("cuda, cuda:1,auto") == [torch.device("cuda", 1)] * 3
        sim.set_device(0)
    with installed(devices=1):
        assert platforms.resolve_devices("cuda, cuda:0,auto") == [torch.device("cuda", 0)] * 3
        with pytest.raises(platforms.DeviceUnavailable, match=r"--device cuda:7: this machine has 1 CUDA device "
                                                               r"\(cuda:0\)"):
            platforms.resolve_devices("cpu,cuda:7")
        with pytest.raises(platforms.DeviceUnavailable, match="--device tpu: not a device"):
            platforms.resolve_devices("tpu")
        needs = [memory_budget.Need(name, platforms.resolve_devices(device)[0], 6, 320, 20, 50 * GIB)
                 for name, device in (("a", "cuda"), ("b", "cuda:0"))]
        with pytest.raises(memory_budget.DoesNotFit, match=r"cuda:0 has 80\.00 GiB available but needs 100\.00 GiB"):
            memory_budget.check_fits(needs)


def test_host_copies_are_read_only_after_their_stream_is_synchronised(checkpoint, monkeypatch):
    """Every output leaves the device in a non-blocking copy; the simulated device leaves each
    destination NaN until the worker's stream is synchronised. With the worker's one wait the
    results equal the CPU's; without it (the control) they are NaN."""
    batch = _inputs([9, 22, 31], seed=2, outputs=EVERY, layers=(0, 1, 2))
    with installed():
        worker = ModelWorker({"m": load("m", checkpoint)}, platforms.resolve_devices("cuda")[0])
        with worker.on_device():
            got = worker.run(batch)
        monkeypatch.setattr(CudaPlatform, "wait", lambda self, stream=None: None)
        with worker.on_device():
            unsynchronised = worker.run(batch)
    _assert_same(got, _on_cpu(checkpoint, batch))
    assert np.isnan(unsynchronised[0].logits).all()


def test_pinned_host_memory_stays_bounded_over_many_batches(checkpoint):
    """Defect 5: one pinned buffer per output per batch, kept by the caching host allocator.
    Now each worker copies into one pinned buffer of bounded size (here 8 KiB), the rest into
    pageable memory: over 12 batches of every output and layer the allocator's pinned memory
    stays under twice the bound plus the token ids, and every result equals the CPU's."""
    bound = 8 << 10
    rng = np.random.default_rng(3)
    batches = [_inputs(rng.integers(5, 40, int(rng.integers(1, 5))), seed=i, outputs=EVERY, layers=(0, 1, 2))
               for i in range(12)]
    with installed() as sim:
        worker = ModelWorker({"m": load("m", checkpoint)}, platforms.resolve_devices("cuda")[0])
        worker.staging = CudaPlatform(worker.device, sim, staging_bytes=bound).host_staging()
        with worker.on_device():
            results = [worker.run(batch) for batch in batches]
        largest_tokens = max(len(b) * max(i.length for i in b) for b in batches) * 8
        assert sim.pinned.reserved <= 2 * bound + 2 * (1 << (largest_tokens - 1).bit_length())
    for batch, got in zip(batches[::6], results[::6]):
        _assert_same(got, _on_cpu(checkpoint, batch))


def test_the_batch_sweep_probes_on_the_workers_stream(checkpoint):
    """Defect 7: `--max-batch-tokens sweep` timed its probes on the default stream, where the
    caching allocator's blocks serve no other stream. Through the server's own start-up steps:
    every wait of the sweep is on the worker's stream."""
    with installed() as sim:
        args = server.parse_args(["--models", "m", "--checkpoint", f"m={checkpoint}", "--device", "cuda",
                                  "--max-batch-tokens", "sweep", "--batch-sweep-seconds", "1"])
        server.choose_precisions(args)
        models = server.load_models(args)
        router = server.build_schedulers(models, args)
        worker = router.schedulers["m"].workers[0]
        assert models["m"].budget.tokens_per_s and sim.waits
        assert set(sim.waits) == {worker.stream}


class _HostSyncs(TorchFunctionMode):
    """Counts the tensor calls that make the host wait for a CUDA device, until the first layer
    ends (the hook's first call): before that, the host should only queue work."""

    SYNCS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.before_layers: list[str] = []
        self.layers_queued = False

    def between_layers(self):
        self.layers_queued = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS and not self.layers_queued:
            tensor = args[0] if args else None
            if isinstance(tensor, torch.Tensor) and tensor.dtype != torch.int32:  # int32: cu_seqlens, host-made
                self.before_layers.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [False, True])
def test_no_host_sync_before_the_layers_are_queued(checkpoint, packed):
    """Defect 8: `padding_mask.any()` (padded) and `int(lengths.max())` (packed) made the host
    wait for the device before any layer was queued; the host's lengths answer both."""
    batch = _inputs([9, 22, 31], seed=5)
    with installed():
        worker = ModelWorker({"m": load("m", checkpoint)}, platforms.resolve_devices("cuda")[0], packed=packed)
        syncs = _HostSyncs()
        worker.layer_hook = syncs
        with worker.on_device(), syncs:
            got = worker.run(batch)
    assert syncs.layers_queued and syncs.before_layers == []
    _assert_same(got, _on_cpu(checkpoint, batch))


@pytest.mark.parametrize("form", list(OOM_FORMS))
def test_every_form_of_cuda_out_of_memory_splits_the_batch(checkpoint, form):
    """Defect 9: a plain "CUDA error: out of memory" was not classed as out of memory (INTERNAL
    instead of a split). The simulated device fails batches of more than 60 tokens, in each form
    CUDA has; four items of 20 tokens run as two halves, each result its own."""
    batch = _inputs([20, 20, 20, 20], seed=6)
    with installed(oom_above_tokens=60, oom_form=form):
        worker = ModelWorker({"m": load("m", checkpoint)}, platforms.resolve_devices("cuda")[0])
        with worker.on_device():
            got = worker.run(batch)
    _assert_same(got, _on_cpu(checkpoint, batch))


def test_a_device_side_assert_is_not_out_of_memory():
    with installed():
        platform = platforms.of(platforms.resolve_devices("cuda")[0])
        assert not platform.is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
        assert platform.is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"))


def test_two_simulated_devices_each_run_a_worker_bound_to_it(checkpoint):
    """Two devices: replicate puts a copy on each, one worker per device, each bound to its own."""
    with installed(devices=2) as sim:
        devices = platforms.resolve_devices("cuda:0,cuda:1")
        sets = replicate({"m": load("m", checkpoint)}, devices)
        workers = [ModelWorker(models, device) for models, device in zip(sets, devices)]
        batch = _inputs([10, 14, 18, 40], seed=7)

        async def test(scheduler):
            return [await result for result in scheduler.submit(batch)]

        results = run_scheduler(test, workers, max_batch_size=1)
        assert sorted(sim.set_devices) == [0, 1]
    _assert_same(results, _on_cpu(checkpoint, batch))
