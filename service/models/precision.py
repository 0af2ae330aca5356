"""The precision the model computes in, and whether the device computes it natively.

fp32 is the default and matches fair-esm. fp16/bf16 run the forward under autocast. int8
(CPU only) quantizes the transformer layers' Linear modules (service.models.quantize) and
computes the rest in fp32. On a
CPU without native bf16 (AVX512_BF16 or AMX) or fp16 (AVX512_FP16 or AMX-FP16) instructions,
oneDNN emulates them through fp32 conversions: slower than fp32 and less accurate, so the
server refuses at start-up rather than serve something worse than its default.
"""

from __future__ import annotations

from pathlib import Path

import torch

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16,
                   "int8": None}  # int8: no autocast; int8 Linear layers, the rest fp32
PRECISIONS = tuple(AUTOCAST_DTYPES)


class PrecisionUnsupported(RuntimeError):
    """The requested precision would be emulated (slowly) on this device."""


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native(precision: str) -> bool:
    """Whether this CPU has instructions for `precision` ("bf16" or "fp16"), asked of torch
    first (it knows what oneDNN will use) and of /proc/cpuinfo second."""
    cpu = torch.cpu
    if precision == "bf16":
        probes, flags = ("_is_avx512_bf16_supported", "_is_amx_tile_supported"), {"avx512_bf16", "amx_bf16"}
    else:
        probes, flags = ("_is_amx_fp16_supported",), {"avx512_fp16", "amx_fp16"}
    if any(getattr(cpu, probe, lambda: False)() for probe in probes):
        return True
    return bool(flags & cpu_flags())


def check(precision: str, device: torch.device, cpu_native_override: bool | None = None) -> None:
    """Raise PrecisionUnsupported where `precision` would be emulated on `device`.

    `cpu_native_override` replaces the CPU probe: the server's hidden testing flag sets it to
    check the refusal (or the reduced-precision path) on any machine."""
    if precision == "fp32":
        return
    if precision == "int8":
        if device.type != "cpu":
            raise PrecisionUnsupported(f"--precision int8 is for CPUs (dynamic int8 quantization); on {device} "
                                       "use --precision bf16 or fp16")
        from service.models import quantize

        if quantize.engine() is None:
            raise PrecisionUnsupported("--precision int8: this torch build has no quantized CPU engine")
        return
    if device.type == "cpu":
        native = cpu_native(precision) if cpu_native_override is None else cpu_native_override
        if not native:
            needs = "AVX512_BF16 or AMX" if precision == "bf16" else "AVX512_FP16 or AMX-FP16"
            raise PrecisionUnsupported(
                f"--precision {precision}: this CPU has no native {precision} instructions ({needs}); "
                f"{precision} would be emulated, slower than fp32. Use --precision fp32 (the default) "
                f"here, or a CPU with {needs}, or a GPU")
    elif device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise PrecisionUnsupported(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                                   "use --precision fp16 or fp32")
