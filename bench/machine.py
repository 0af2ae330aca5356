"""What the numbers were measured on, and what that machine can do at best."""

from __future__ import annotations

import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The CPU flags that decide which kernels MKL, oneDNN, aten and ONNX Runtime's MLAS run.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
              "amx_tile", "amx_bf16", "amx_int8")
# Environment variables that cap the instruction set torch's libraries use (an AVX2 run on an
# AVX-512 machine sets all three; ONNX Runtime has no such switch, so its kernels stay native).
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def cpu_flags() -> list[str]:
    """The SIMD flags of /proc/cpuinfo that matter to the kernels, in SIMD_FLAGS order."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in present]
    except OSError:
        pass
    return []


def describe() -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {name: os.environ[name] for name in ISA_CAPS if name in os.environ},
        "onnxruntime": _version("onnxruntime"),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "fair_esm": metadata.version("fair-esm"),
        "grpcio": metadata.version("grpcio"),
        "python": platform.python_version(),
        "os": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def headline() -> str:
    """One line naming the machine as every table of the engine benches heads it: CPU, flags,
    torch's threads and CPU capability, instruction-set caps, onnxruntime and the load."""
    info = describe()
    caps = ", ".join(f"{k}={v}" for k, v in info["isa_caps"].items()) or "none"
    return (f"{info['cpu']}, {info['cpu_cores']} cores; CPU flags: {' '.join(info['cpu_flags'])}; torch "
            f"{info['torch']} ({info['torch_threads']} threads, CPU capability {info['torch_cpu_capability']}); "
            f"instruction-set caps: {caps}; onnxruntime {info['onnxruntime']}; load average "
            f"{', '.join(f'{x:.2f}' for x in info['load_average_at_start'])}")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def synchronize_all() -> None:
    """Wait for every CUDA device, not only the current one: work timed on cuda:1 (or spread over
    several) is otherwise still running when the clock stops."""
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Best-case dense matmul FLOP/s (median of `repeats` timings), the ceiling for model FLOPs utilisation."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    calls = max(1, int(2e11 // (2 * n**3))) if device == "cpu" else 50  # ~1-2 s per timing on a small CPU

    def sync():
        if device != "cpu":
            synchronize_all()

    a @ b
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync()
        rates.append(2 * n**3 * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def peak_rss_bytes(pid: int) -> int:
    """High-water mark of a live process's resident memory (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def model_flops(parameters: int, layers: int, dim: int, residue_counts) -> float:
    """Useful FLOPs of a forward pass over unpadded sequences: 2 x parameters x tokens, plus
    QK^T and attention x V (2 x 2 x T^2 x dim per layer). BOS/EOS count as tokens; padding does not."""
    total = 0.0
    for residues in residue_counts:
        tokens = residues + 2
        total += 2 * parameters * tokens + 4 * layers * dim * tokens**2
    return total


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of a live process, or of this one."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Restart a process's VmHWM from its current RSS (Linux clear_refs), so that a later peak
    measures what came after, not the checkpoint load. False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
