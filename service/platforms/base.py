"""What the engine and the models ask of a device: the interface of service.platforms."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import numpy as np
import torch


class DeviceUnavailable(RuntimeError):
    """`--device` names no usable device here: a start-up error naming the flag."""


# What an allocation failure says besides torch.OutOfMemoryError: the CPU allocator; CUDA's own
# error (a kernel or cudaMalloc outside the caching allocator: "CUDA error: out of memory"), and
# cuBLAS / cuDNN when they cannot get their workspace (a plain RuntimeError, often on the first
# matmul after the caching allocator has taken nearly all of the device).
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "CUDA out of memory", "CUDA error: out of memory",
                          "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in OUT_OF_MEMORY_MESSAGES))


class HostStaging:
    """A worker's host memory for its batches' outputs (none on a CPU: outputs are host memory)."""


class Platform(ABC):
    """One device: `device` is its name as callers and logs see it (cpu, cuda:1), `tensor_device`
    where its tensors live (the same, except on the simulated CUDA device of the tests)."""

    device: torch.device
    tensor_device: torch.device

    @property
    def type(self) -> str:
        return self.device.type

    def make_current(self) -> None:
        """Make this device the calling thread's current device (the worker thread, once)."""

    def new_stream(self):
        """A stream of its own for a worker, or None where the device has no streams."""
        return None

    def running_on(self, stream):
        """Context: this device current and `stream` the current stream."""
        return contextlib.nullcontext()

    def wait(self, stream=None) -> None:
        """Block until the device has done what is queued on `stream` (the current one if None)."""

    def synchronize(self) -> None:
        """Block until the device has done everything queued on it."""

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor's copy on the device (pinned and non-blocking where there is a DMA engine)."""
        return host.to(self.tensor_device)

    def host_staging(self) -> HostStaging:
        return HostStaging()

    @abstractmethod
    def to_host(self, tensors: list[torch.Tensor], staging: HostStaging, stream=None) -> list[np.ndarray]:
        """float32 host copies of `tensors`, valid once this returns: one wait for all of them."""

    def autocast(self, dtype: torch.dtype):
        return torch.autocast(self.tensor_device.type, dtype=dtype)

    def capability(self) -> tuple[int, int] | None:
        """The CUDA compute capability; None for a CPU."""
        return None

    def peak_bytes(self) -> int | None:
        """The most device memory allocated at once so far, where the device counts it (CUDA)."""
        return None

    def free_bytes(self) -> int | None:
        """Free device memory, where the device has its own (CPU memory: memory_budget)."""
        return None

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return is_out_of_memory(exc)

    def release_cache(self) -> None:
        """Give cached device memory back (between benchmark models; never on the request path)."""
