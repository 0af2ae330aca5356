"""The device seam: every device-specific call of the engine and the models goes through a
`Platform` (service.platforms.base), one per device the server runs on. `cpu.py` is the CPU's,
`cuda.py` CUDA's; nothing else in `service/` calls `torch.cuda`.

`resolve_devices` turns `--device` into devices, normalised once: `auto` is the current CUDA
device where CUDA is available (else the CPU), `cuda` is `cuda:<current>`, and an index beyond
the device count is refused at start-up naming `--device` (DeviceUnavailable).

One hook, for tests: `ESM_DEVICE_PLUGIN` names a Python file whose `cuda_runtime()` stands in
for torch.cuda under the same CudaPlatform (tests/simulated_cuda.py: a simulated CUDA device that
computes on the CPU and keeps CUDA's contracts). Unset, as on every production start, torch.cuda
itself is the runtime and nothing is loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from service.platforms.base import DeviceUnavailable, HostStaging, Platform
from service.platforms.cpu import CpuPlatform
from service.platforms.cuda import CudaPlatform, CudaRuntime, TorchCuda

__all__ = ["DeviceUnavailable", "HostStaging", "Platform", "cuda_runtime", "load_plugin", "of", "resolve_devices",
           "set_cuda_runtime"]

_runtime: CudaRuntime = TorchCuda()
_platforms: dict[torch.device, Platform] = {}


def cuda_runtime() -> CudaRuntime:
    return _runtime


def set_cuda_runtime(runtime: CudaRuntime) -> CudaRuntime:
    """Use `runtime` for CUDA devices from now on; returns the one it replaces."""
    global _runtime
    previous, _runtime = _runtime, runtime
    _platforms.clear()
    return previous


def load_plugin(path: Path | None) -> None:
    """The test hook (ESM_DEVICE_PLUGIN): `path`'s `cuda_runtime()` becomes the CUDA runtime."""
    if path is None:
        return
    spec = importlib.util.spec_from_file_location("esm2_device_plugin", path)
    if spec is None or spec.loader is None:
        raise DeviceUnavailable(f"ESM_DEVICE_PLUGIN={path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    set_cuda_runtime(module.cuda_runtime())


def of(device: torch.device) -> Platform:
    """The platform of `device` (a normalised device from resolve_devices), made once."""
    if device not in _platforms:
        _platforms[device] = CudaPlatform(device, _runtime) if device.type == "cuda" else CpuPlatform(device)
    return _platforms[device]


def resolve_device(requested: str) -> torch.device:
    name = requested.strip()
    if name == "auto":
        return torch.device("cuda", _runtime.current_device()) if _runtime.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceUnavailable(f"--device {name}: the server runs on cpu or cuda devices")
    if not _runtime.is_available():
        raise DeviceUnavailable(f"--device {name}: CUDA is not available on this machine "
                                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
    count = _runtime.device_count()
    index = _runtime.current_device() if device.index is None else device.index
    if index >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        raise DeviceUnavailable(f"--device {name}: this machine has {count} CUDA device{'s' * (count != 1)} ({have})")
    return torch.device("cuda", index)


def resolve_devices(requested: str) -> list[torch.device]:
    """`--device` as a comma-separated list, each normalised: one model worker per entry
    (`cpu,cpu` runs two on CPU; `cuda` and `cuda:0` are the same device)."""
    names = [name.strip() for name in requested.split(",") if name.strip()]
    if not names:
        raise DeviceUnavailable(f"--device {requested!r}: no device named")
    return [resolve_device(name) for name in names]
