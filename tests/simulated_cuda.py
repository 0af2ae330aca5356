"""A simulated CUDA device: computes on the CPU, keeps CUDA's contracts (docs/gpus.md).

It is a `CudaRuntime` (service/platforms/cuda.py) under the service's own CudaPlatform, so the
server's real start-up and request path run with `--device cuda` on a machine without a GPU:
- device arguments go through torch's own validator, as torch.cuda.set_device does (a bare
  `cuda` is refused there the way a GPU start refuses it);
- a non-blocking device-to-host copy leaves its destination NaN until the stream it was queued
  on is synchronised: a read before the wait fails parity;
- pinned host memory is counted as torch's caching host allocator holds it (power-of-two blocks,
  cached once freed, never returned);
- out of memory can be raised when a batch of more than N tokens goes to the device, in each form
  CUDA reports it (OOM_FORMS);
- each device has the compute capability a test chooses; any number of devices.

In the test process: `with installed(devices=2) as sim: ...`. For a server process:
`start_server(..., env=server_env(devices=2))` sets ESM_DEVICE_PLUGIN to this file (the one hook,
service.platforms.load_plugin) and the ESM_SIM_CUDA_* variables `cuda_runtime()` reads.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from pathlib import Path

import torch
from torch.cuda._utils import _get_device_index

from service import platforms

GIB = 1 << 30
# How CUDA says it ran out of memory: the caching allocator, its message as a plain RuntimeError
# (older torch, and re-raised errors), a cudaMalloc outside the caching allocator, cuBLAS's handle.
OOM_FORMS = {
    "OutOfMemoryError": lambda n: torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB ({n} tokens)"),
    "CUDA out of memory": lambda n: RuntimeError(f"CUDA out of memory. Tried to allocate 20.00 MiB ({n} tokens)"),
    "CUDA error: out of memory": lambda n: RuntimeError(
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, "
        "so the stacktrace below might be incorrect."),
    "cuBLAS": lambda n: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
}


class SimulatedStream:
    def __init__(self, sim: SimulatedCuda, index: int, default: bool = False):
        self.sim, self.index, self.default = sim, index, default
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, value) of queued D2H copies

    def synchronize(self) -> None:
        with self.sim.lock:
            pending, self.pending = self.pending, []
            self.sim.waits.append(self)
        for destination, value in pending:
            destination.copy_(value)

    def __repr__(self) -> str:
        return f"<{'default' if self.default else 'worker'} stream of cuda:{self.index} #{id(self) % 10000}>"


class PinnedHostMemory:
    """torch's caching host allocator, counted: a request takes a free block of its power-of-two
    size or a new one; a freed block is cached, never returned to the OS."""

    def __init__(self):
        self.lock = threading.Lock()
        self.free: dict[int, int] = {}  # block size -> cached free blocks
        self.reserved = 0  # bytes of every block ever made

    def allocate(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        size = max(1, numel * torch.empty(0, dtype=dtype).element_size())
        block = 1 << (size - 1).bit_length()
        with self.lock:
            if self.free.get(block):
                self.free[block] -= 1
            else:
                self.reserved += block
        tensor = torch.empty(numel, dtype=dtype)
        weakref.finalize(tensor, self._release, block)
        return tensor

    def _release(self, block: int) -> None:
        with self.lock:
            self.free[block] = self.free.get(block, 0) + 1


class SimulatedCuda:
    def __init__(self, devices: int = 1, capability: tuple[int, int] | list[tuple[int, int]] = (9, 0),
                 memory_bytes: int = 80 * GIB, oom_above_tokens: int = 0, oom_form: str = "OutOfMemoryError"):
        self.count = devices
        self.capabilities = list(capability) if isinstance(capability, list) else [capability] * devices
        self.memory_bytes = memory_bytes
        self.oom_above_tokens, self.oom_form = oom_above_tokens, OOM_FORMS[oom_form]
        self.lock = threading.Lock()
        self.local = threading.local()  # the thread's current device and streams, as CUDA's are per thread
        self.default_streams = [SimulatedStream(self, i, default=True) for i in range(devices)]
        self.streams: list[SimulatedStream] = list(self.default_streams)
        self.pinned = PinnedHostMemory()
        self.waits: list[SimulatedStream] = []  # every stream synchronised, in order
        self.set_devices: list[int] = []  # every set_device, by index
        self.largest_copy_in = [0] * devices  # bytes, per device

    def _index(self, device) -> int:
        index = _get_device_index(device)  # torch's validator: a bare `cuda` or a `cpu` is refused here
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return getattr(self.local, "device", 0)

    def set_device(self, device) -> None:
        self.local.device = self._index(device)
        self.set_devices.append(self.local.device)

    def tensor_device(self, device) -> torch.device:
        self._index(device)
        return torch.device("cpu")

    def new_stream(self, device) -> SimulatedStream:
        stream = SimulatedStream(self, self._index(device))
        with self.lock:
            self.streams.append(stream)
        return stream

    def current_stream(self, device) -> SimulatedStream:
        index = self._index(device)
        return getattr(self.local, "streams", {}).get(index) or self.default_streams[index]

    @contextlib.contextmanager
    def use(self, device, stream: SimulatedStream):
        index = self._index(device)
        previous_device = self.current_device()
        streams = getattr(self.local, "streams", {})
        previous_stream = streams.get(index)
        self.local.device, self.local.streams = index, {**streams, index: stream}
        try:
            yield
        finally:
            self.local.device = previous_device
            self.local.streams = {**self.local.streams, index: previous_stream}

    def synchronize(self, device) -> None:
        index = self._index(device)
        for stream in [s for s in self.streams if s.index == index]:
            stream.synchronize()

    def mem_get_info(self, device) -> tuple[int, int]:
        self._index(device)
        return self.memory_bytes, self.memory_bytes

    def get_device_capability(self, device) -> tuple[int, int]:
        return self.capabilities[self._index(device)]

    def empty_cache(self) -> None:
        pass

    def max_memory_allocated(self, device) -> int:
        """The largest batch of token ids sent to the device: the simulated device holds no more
        (its activations are CPU memory), a stand-in that lets the peak's plumbing be tested."""
        return self.largest_copy_in[self._index(device)]

    def autocast(self, dtype: torch.dtype):
        return torch.autocast("cpu", dtype=dtype)

    def pinned_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.pinned.allocate(numel, dtype)

    def copy_to_device(self, pinned: torch.Tensor, device) -> torch.Tensor:
        index = self._index(device)
        self.largest_copy_in[index] = max(self.largest_copy_in[index], pinned.numel() * pinned.element_size())
        if self.oom_above_tokens and not pinned.is_floating_point() and pinned.numel() > self.oom_above_tokens:
            raise self.oom_form(pinned.numel())  # a batch of token ids too large for this device
        return pinned.clone()

    def copy_to_host(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        value = source.detach().to(destination.dtype, copy=True)
        destination.fill_(float("nan") if destination.is_floating_point() else -(1 << 30))  # not there yet
        stream = self.current_stream(torch.device("cuda", self.current_device()))
        with self.lock:
            stream.pending.append((destination, value))


def cuda_runtime() -> SimulatedCuda:
    """The plugin entry (ESM_DEVICE_PLUGIN): a SimulatedCuda as the ESM_SIM_CUDA_* variables say."""
    capabilities = [tuple(int(p) for p in c.split(".")) for c in os.environ.get("ESM_SIM_CUDA_CAPABILITY", "9.0").split(",")]
    devices = int(os.environ.get("ESM_SIM_CUDA_DEVICES", "1"))
    return SimulatedCuda(devices, capabilities if len(capabilities) > 1 else capabilities[0],
                         int(float(os.environ.get("ESM_SIM_CUDA_MEMORY_GIB", "80")) * GIB),
                         int(os.environ.get("ESM_SIM_CUDA_OOM_ABOVE_TOKENS", "0")),
                         os.environ.get("ESM_SIM_CUDA_OOM_FORM", "OutOfMemoryError"))


def server_env(devices: int = 1, capability: str = "9.0", memory_gib: float = 80, oom_above_tokens: int = 0,
               oom_form: str = "OutOfMemoryError") -> dict[str, str]:
    """The environment of a server process on simulated CUDA devices."""
    return {"ESM_DEVICE_PLUGIN": str(Path(__file__).resolve()), "ESM_SIM_CUDA_DEVICES": str(devices),
            "ESM_SIM_CUDA_CAPABILITY": capability, "ESM_SIM_CUDA_MEMORY_GIB": str(memory_gib),
            "ESM_SIM_CUDA_OOM_ABOVE_TOKENS": str(oom_above_tokens), "ESM_SIM_CUDA_OOM_FORM": oom_form}


@contextlib.contextmanager
def installed(**kwargs):
    """The simulated device as this process's CUDA runtime, for the block."""
    sim = SimulatedCuda(**kwargs)
    previous = platforms.set_cuda_runtime(sim)
    try:
        yield sim
    finally:
        platforms.set_cuda_runtime(previous)
