"""The one thread that owns the device and calls the models.

fair-esm's rotary-embedding cache is mutable module state that breaks under
concurrent calls with different lengths, so nothing else ever runs a model. The
worker takes ready-made batches of token ids and returns numpy outputs per item;
it never sees a request message.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from esm2_wire import output_kinds
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from service.models.checkpoints import LoadedModel
from service.errors import Internal, OutOfMemory, ServiceError
from service.engine.interleaving import RunAfterRunningBatch
from service.engine.faults import FaultHook
from service.engine.inputs import ModelInput
from service.engine.policy import runs_packed
from service.models.forward import BatchOutput, BatchPlan, LayerHook, forward
from service.models.packed import pack, packed_forward, unpack
from service.models.precision import AUTOCAST_DTYPES
from service.models.quantize import quantize_layers
from service import metrics, platforms
from service.platforms import HostStaging, Platform

log = logging.getLogger(__name__)


class DeviceUnusable(Exception):
    """The device fails every call (e.g. after a CUDA device-side assert): only a restart helps."""


def replicate(models: dict[str, LoadedModel], devices: list[torch.device]) -> list[dict[str, LoadedModel]]:
    """One set of models per worker, each already on its device. Every worker gets its own
    modules, CPU workers too: fair-esm's attention layers keep a rotary cache that concurrent
    calls would share. Each copy is made from the loaded (host) set and moved to its device
    before the next is made, and the loaded set moves last: the host never holds more than one
    copy beside the loaded one (3B on two GPUs: 12 GB more, not 12 GB per extra device)."""
    copies = []
    for device in devices[1:]:
        where = platforms.of(device).tensor_device
        copies.append({name: dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(where))
                       for name, loaded in models.items()})
    for loaded in models.values():
        loaded.model.to(platforms.of(devices[0]).tensor_device)
    return [models, *copies]


@dataclass
class HostOutput:
    """A batch's outputs on the host, as float32 numpy: each left the device in one copy (into
    the worker's pinned buffer on CUDA, without a sync per copy), and items are sliced from them here."""

    means: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [B, D], each row its item's mean
    representations: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [B, T, D] (per-token asked)
    bos: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [B, D]
    logits: np.ndarray | None = None
    contacts: np.ndarray | None = None
    attentions: np.ndarray | None = None


def to_host(out: BatchOutput, batch: list[ModelInput], platform: Platform, staging: HostStaging | None = None,
            stream=None) -> HostOutput:
    """Copy what `batch`'s items asked for off the device: one non-blocking copy per output (per
    layer for representations), then one wait for the stream (Platform.to_host). Means are
    reduced on the device first (the same reduction, row by row, as one item alone), so only
    [B, D] leaves it."""
    places: list[tuple[str, int | None]] = []
    tensors: list[torch.Tensor] = []

    def send(tensor: torch.Tensor, where: str, layer: int | None = None) -> None:
        places.append((where, layer))
        tensors.append(tensor)

    def asks(kind: OutputKind, layer: int) -> bool:
        return any(kind in item.outputs and layer in item.layers for item in batch)

    for layer, rep in out.representations.items():
        if asks(OutputKind.MEAN, layer):
            send(torch.stack([rep[row, 1 : item.length - 1].mean(0) for row, item in enumerate(batch)]), "means",
                 layer)
        if asks(OutputKind.PER_TOKEN, layer):
            send(rep, "representations", layer)
        if asks(OutputKind.BOS, layer):
            send(rep[:, 0], "bos", layer)
    for kind in ("logits", "contacts", "attentions"):
        if getattr(out, kind) is not None:
            send(getattr(out, kind), kind)
    host = HostOutput()
    arrays = platform.to_host(tensors, staging if staging is not None else platform.host_staging(), stream)
    for (where, layer), array in zip(places, arrays):
        if layer is None:
            setattr(host, where, array)
        else:
            getattr(host, where)[layer] = array
    return host


class ModelWorker:
    def __init__(
        self,
        models: dict[str, LoadedModel],
        device: torch.device,
        precision: str = "fp32",
        fast_attention: bool = True,
        simulate_oom_above_tokens: int = 0,
        faults: FaultHook | None = None,
        packed: bool = False,
    ):
        self.models = models
        self.device = device
        self.precision = precision
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.fast_attention = fast_attention
        # The packed layout (ModelSettings.packed_layout): batches that need no attention maps take
        # the packed path (service.models.packed).
        self.packed = packed
        # Testing aid: behave as if the device ran out of memory on larger batches.
        self.simulate_oom_above_tokens = simulate_oom_above_tokens
        self.faults = faults  # None unless armed at start-up (service.engine.faults)
        # Called between the layers of each batch run (its worker slot's interleaver; see
        # service.engine.dispatch); not within the halves of a batch split after running out of memory.
        self.layer_hook: LayerHook | None = None
        self.last_forward_ns: tuple[int, int] | None = None  # the batch's trace spans (service.engine.dispatch)
        self.platform = platforms.of(device)  # every device-specific call goes through it
        # Its own stream on CUDA: two models' workers on one GPU overlap instead of queueing on
        # the default stream.
        self.stream = self.platform.new_stream()
        self.staging = self.platform.host_staging()  # the worker's pinned output buffer on CUDA, bounded
        self.progress = Progress()
        for loaded in models.values():
            loaded.model.to(self.platform.tensor_device)  # a no-op after replicate()
            if precision == "int8":  # this worker's own copy (replicate), quantized once here
                quantize_layers(loaded.model)

    def bind_thread(self) -> None:
        """Run once on the worker's thread (its executor's initializer): make the worker's device
        the thread's current device, so that whatever torch allocates without naming a device
        (and the caching allocator's bookkeeping) lands there, not on cuda:0."""
        self.platform.make_current()

    def settle(self) -> None:
        """Wait until the device has done everything queued on this worker's stream. On CUDA the
        host runs layers ahead of the device; work run between layers first waits here, so that it
        is not queued behind them and its timing does not include theirs. No-op on a CPU."""
        if self.stream is not None:
            self.platform.wait(self.stream)
        self.progress.mark()

    def on_device(self):
        """Context: the worker's device current and its stream the current stream."""
        return self.platform.running_on(self.stream)

    def run(self, batch: list[ModelInput]) -> list[ItemResult | ServiceError]:
        """Compute a batch (all items of one model), calling `layer_hook` between its layers.

        A failing batch fails only its own items, unless the device fails too: then
        DeviceUnusable, since every later call would fail as well. A batch run between the layers
        of another that runs out of memory raises RunAfterRunningBatch: the other's activations
        hold memory, so halving it now would split it for nothing.
        """
        with self.progress.running(), self.on_device():
            results = self._attempt(batch, self.layer_hook, nested=self.progress.depth > 1)
        peak = self.platform.peak_bytes()
        if peak is not None:
            metrics.DEVICE_MEMORY_PEAK.labels(str(self.device)).set(peak)
        return results

    def _attempt(self, batch: list[ModelInput], hook: LayerHook | None,
                 nested: bool = False) -> list[ItemResult | ServiceError]:
        try:
            if self.faults is not None:
                self.faults.before_batch()
            return self._run(batch, hook)
        except Exception as exc:
            if not self.platform.is_out_of_memory(exc):
                log.exception("batch of %d items failed", len(batch))
                if not self.device_usable():
                    raise DeviceUnusable(f"{self.device} fails every call after: {exc}") from exc
                return [Internal("model failure; see the server log") for _ in batch]
        # No release of the device's cache: the caching allocator already frees its cached blocks and
        # retries before it raises, and empty_cache synchronizes every device of the process.
        if nested:
            raise RunAfterRunningBatch(f"out of memory between layers on a batch of {len(batch)}")
        if len(batch) == 1:
            return [OutOfMemory(f"a {batch[0].length - 2}-residue sequence does not fit in {self.device} memory")]
        half = len(batch) // 2
        log.warning("out of memory on a batch of %d; retrying as %d + %d", len(batch), half, len(batch) - half)
        return self._attempt(batch[:half], None) + self._attempt(batch[half:], None)

    def device_usable(self) -> bool:
        """A tiny computation that must succeed; CUDA errors such as device-side asserts are sticky."""
        try:
            if self.faults is not None:
                self.faults.check_device()
            return torch.ones(1, device=self.platform.tensor_device).add_(1).item() == 2.0  # .item() synchronizes
        except Exception:
            log.exception("device check failed on %s", self.device)
            return False

    def _run(self, batch: list[ModelInput], hook: LayerHook | None) -> list[ItemResult]:
        loaded = self.models[batch[0].model]
        width = max(item.length for item in batch)
        if self.simulate_oom_above_tokens and width * len(batch) > self.simulate_oom_above_tokens:
            raise torch.OutOfMemoryError(f"simulated: {len(batch)} x {width} tokens")
        plan = BatchPlan(
            layers=frozenset(layer for item in batch if output_kinds.per_layer(item.outputs) for layer in item.layers),
            outputs=frozenset().union(*(item.outputs for item in batch)),
            fast_attention=self.fast_attention,
        )
        autocast = (
            self.platform.autocast(self.autocast_dtype) if self.autocast_dtype is not None else contextlib.nullcontext()
        )
        started_ns = time.time_ns()
        with autocast:
            if runs_packed(plan.needs_maps, self.packed):
                out = self._forward_packed(loaded, batch, plan, hook)
            else:
                out = self._forward_padded(loaded, batch, plan, hook, width)
        self.last_forward_ns = (started_ns, time.time_ns())  # on CUDA: until the last layer was queued
        host = to_host(out, batch, self.platform, self.staging, self.stream)
        del out  # the device's copies go before the items are sliced
        return [self._extract(host, row, item) for row, item in enumerate(batch)]

    def _forward_padded(self, loaded, batch: list[ModelInput], plan: BatchPlan, hook: LayerHook | None,
                        width: int) -> BatchOutput:
        tokens = torch.full((len(batch), width), loaded.alphabet.padding_idx, dtype=torch.int64)
        for row, item in enumerate(batch):
            tokens[row, : item.length] = torch.from_numpy(item.token_ids)
        # The lengths from the host: whether the batch has padding is known without asking the device.
        return forward(loaded.model, self.platform.to_device(tokens), plan, self.progress.hook(hook),
                       lengths=[item.length for item in batch])

    def _forward_packed(self, loaded, batch: list[ModelInput], plan: BatchPlan,
                        hook: LayerHook | None) -> BatchOutput:
        tokens, cu_seqlens = pack([torch.from_numpy(item.token_ids) for item in batch])
        out = packed_forward(loaded.model, self.platform.to_device(tokens), cu_seqlens, plan,
                             self.progress.hook(hook))
        return unpack(out, cu_seqlens)

    @staticmethod
    def _extract(host: HostOutput, row: int, item: ModelInput) -> ItemResult:
        # Copies of the host arrays' slices, so that no item keeps the whole batch's arrays alive.
        residues = item.length - 2
        result = ItemResult()
        for layer in item.layers:
            if OutputKind.MEAN in item.outputs and layer in host.means:
                result.mean[layer] = host.means[layer][row].copy()
            if OutputKind.BOS in item.outputs and layer in host.bos:
                result.bos[layer] = host.bos[layer][row].copy()
            if OutputKind.PER_TOKEN in item.outputs and layer in host.representations:
                result.per_token[layer] = host.representations[layer][row, 1 : residues + 1].copy()
        if OutputKind.LOGITS in item.outputs:
            result.logits = host.logits[row, 1 : residues + 1].copy()
        if OutputKind.CONTACTS in item.outputs:
            result.contacts = host.contacts[row, :residues, :residues].copy()
        if OutputKind.ATTENTIONS in item.outputs:
            result.attentions = host.attentions[row, 1 : residues + 1, 1 : residues + 1].copy()
        return result


class Progress:
    """When the worker last made progress (began a batch, finished a layer or a batch), and
    whether it is inside one: a hung device shows as a worker inside a batch whose progress
    stopped (the server's liveness check reads `stalled_for`)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.at = clock()
        self.depth = 0  # batches running: 1, or 2 while one runs between another's layers

    def mark(self) -> None:
        self.at = self.clock()

    @contextlib.contextmanager
    def running(self):
        self.depth += 1
        self.mark()
        try:
            yield
        finally:
            self.depth -= 1
            self.mark()

    def stalled_for(self) -> float:
        """Seconds inside a batch without progress; 0 while idle."""
        return self.clock() - self.at if self.depth else 0.0

    def hook(self, inner: LayerHook | None) -> LayerHook:
        """A layer hook that marks progress, then calls `inner`."""
        return _ProgressHook(self, inner)


@dataclass
class _ProgressHook:
    progress: Progress
    inner: LayerHook | None

    def between_layers(self) -> None:
        self.progress.mark()
        if self.inner is not None:
            self.inner.between_layers()
