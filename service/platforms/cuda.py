"""CUDA devices. `CudaPlatform` holds the logic (device normalisation is in the package's
resolve_devices; here: current device, streams, pinned non-blocking copies with one wait,
bounded pinned staging, memory, capability, out-of-memory classification); `CudaRuntime` is
the narrow set of torch.cuda calls it makes. `TorchCuda` is torch.cuda itself, the only
runtime of a production start; the tests' simulated device (tests/simulated_cuda.py) is
another, so that this logic runs on CPUs exactly as it runs on a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import numpy as np
import torch

from service.platforms.base import HostStaging, Platform

# Pinned host memory per worker for its batches' outputs. Outputs beyond it in one batch are
# copied into pageable memory instead (a copy that waits for the device): pinned memory is
# locked out of the OS's reach and torch's caching host allocator never returns it, so it must
# not grow with the largest response ever served (37 layers of per-token 3B outputs at 8,192
# tokens are 3.1 GB). Buffers grow by powers of two, so the allocator's cache holds at most
# twice this.
PINNED_STAGING_BYTES = 256 << 20


class CudaRuntime(Protocol):
    """The torch.cuda calls CudaPlatform makes (TorchCuda) or their simulation (tests)."""

    def is_available(self) -> bool: ...
    def device_count(self) -> int: ...
    def current_device(self) -> int: ...
    def set_device(self, device: torch.device) -> None: ...
    def tensor_device(self, device: torch.device) -> torch.device: ...
    def new_stream(self, device: torch.device): ...
    def current_stream(self, device: torch.device): ...
    def use(self, device: torch.device, stream): ...
    def synchronize(self, device: torch.device) -> None: ...
    def mem_get_info(self, device: torch.device) -> tuple[int, int]: ...
    def get_device_capability(self, device: torch.device) -> tuple[int, int]: ...
    def empty_cache(self) -> None: ...
    def max_memory_allocated(self, device: torch.device) -> int: ...
    def autocast(self, dtype: torch.dtype): ...
    def pinned_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor: ...
    def copy_to_device(self, pinned: torch.Tensor, device: torch.device) -> torch.Tensor: ...
    def copy_to_host(self, destination: torch.Tensor, source: torch.Tensor) -> None: ...


class TorchCuda:
    """torch.cuda: the runtime of every production start."""

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def set_device(self, device: torch.device) -> None:
        torch.cuda.set_device(device)

    def tensor_device(self, device: torch.device) -> torch.device:
        return device

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def use(self, device: torch.device, stream):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(device))
        stack.enter_context(torch.cuda.stream(stream))
        return stack

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)

    def get_device_capability(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.get_device_capability(device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def max_memory_allocated(self, device: torch.device) -> int:
        return torch.cuda.max_memory_allocated(device)  # the allocator's host-side counter: no sync

    def autocast(self, dtype: torch.dtype):
        return torch.autocast("cuda", dtype=dtype)

    def pinned_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def copy_to_device(self, pinned: torch.Tensor, device: torch.device) -> torch.Tensor:
        return pinned.to(device, non_blocking=True)

    def copy_to_host(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        destination.copy_(source, non_blocking=True)


class PinnedStaging(HostStaging):
    """One worker's pinned output buffer: float32, grown by powers of two up to `limit` bytes."""

    def __init__(self, runtime: CudaRuntime, limit: int):
        self.runtime, self.limit = runtime, limit
        self.buffer: torch.Tensor | None = None

    def take(self, elements: int) -> torch.Tensor:
        """A buffer of at least min(elements, limit) float32 elements."""
        wanted = min(elements * 4, self.limit)
        held = 0 if self.buffer is None else self.buffer.numel() * 4
        if wanted > held:
            self.buffer = None  # back to the allocator before the larger one is taken
            size = min(1 << (wanted - 1).bit_length(), self.limit)
            self.buffer = self.runtime.pinned_empty(size // 4, torch.float32)
        return self.buffer if self.buffer is not None else torch.empty(0)


class CudaPlatform(Platform):
    def __init__(self, device: torch.device, runtime: CudaRuntime, staging_bytes: int = PINNED_STAGING_BYTES):
        assert device.index is not None, "normalised by service.platforms.resolve_devices"
        self.device, self.runtime, self.staging_bytes = device, runtime, staging_bytes
        self.tensor_device = runtime.tensor_device(device)

    def make_current(self) -> None:
        self.runtime.set_device(self.device)

    def new_stream(self):
        return self.runtime.new_stream(self.device)

    def running_on(self, stream):
        return self.runtime.use(self.device, stream)

    def wait(self, stream=None) -> None:
        (stream if stream is not None else self.runtime.current_stream(self.device)).synchronize()

    def synchronize(self) -> None:
        self.runtime.synchronize(self.device)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        pinned = self.runtime.pinned_empty(host.numel(), host.dtype).view(host.shape).copy_(host)
        return self.runtime.copy_to_device(pinned, self.device)

    def host_staging(self) -> PinnedStaging:
        return PinnedStaging(self.runtime, self.staging_bytes)

    def to_host(self, tensors: list[torch.Tensor], staging: HostStaging, stream=None) -> list[np.ndarray]:
        """Each tensor into the worker's pinned buffer with a non-blocking copy, then one wait for
        the stream; what does not fit the buffer's bound goes to pageable memory. The arrays are
        views of the buffer, valid until the worker's next batch (the worker copies items out)."""
        assert isinstance(staging, PinnedStaging)
        tensors = [tensor.float() for tensor in tensors]
        buffer = staging.take(sum(tensor.numel() for tensor in tensors))
        hosts, offset = [], 0
        for tensor in tensors:
            n = tensor.numel()
            if offset + n <= buffer.numel():
                host = buffer[offset : offset + n].view(tensor.shape)
                offset += n
            else:
                host = torch.empty(tensor.shape, dtype=torch.float32)  # pageable: past the pinned bound
            self.runtime.copy_to_host(host, tensor)
            hosts.append(host)
        self.wait(stream)  # the one wait, for every copy above
        return [host.numpy() for host in hosts]

    def capability(self) -> tuple[int, int]:
        return tuple(self.runtime.get_device_capability(self.device))

    def peak_bytes(self) -> int:
        return self.runtime.max_memory_allocated(self.device)

    def free_bytes(self) -> int:
        free, _total = self.runtime.mem_get_info(self.device)
        return free

    def autocast(self, dtype: torch.dtype):
        return self.runtime.autocast(dtype)

    def release_cache(self) -> None:
        self.runtime.empty_cache()
