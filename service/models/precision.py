"""The precision the model computes in, and whether the device computes it natively.

`auto` (the default) is bf16 on a CUDA device that computes it natively (compute capability
8.0 or later: A100, H100, H200, L4...) and fp32 everywhere else, a CPU included: fp32 matches
fair-esm. fp16/bf16 run the forward under autocast, with the Linear layers' weights cast
once at load (`cast_weights`) so that autocast does not re-cast them on every call; the
LayerNorms, the softmax inputs, the contact head and its regression stay fp32. Whatever stays
fp32 on a CUDA device runs its matmuls in TF32 (`use_tf32`), unless a model on CUDA asked for
fp32 itself: then the process keeps full fp32 matmuls, equal to fair-esm.

On a CPU without native bf16 (AVX512_BF16 or AMX) or fp16 (AVX512_FP16 or AMX-FP16)
instructions, oneDNN emulates them through fp32 conversions: slower than fp32 and less
accurate, so the server refuses at start-up rather than serve something worse than its
default. A GPU before compute capability 8.0 (V100, T4) emulates bf16 too, and is refused
it the same way (it has fp16).

int8 (CPU only; refused on a GPU, which has bf16/fp16 for this) quantizes the transformer layers'
Linear modules (service.models.quantize) and computes the rest in fp32, without autocast. It is
never chosen by `auto`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from service import platforms

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16,
                   "int8": None}  # int8: no autocast; int8 Linear layers, the rest fp32
CUDA_NATIVE_BF16 = (8, 0)  # compute capability from which bf16 has tensor-core instructions (Ampere)


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
            raise PrecisionUnsupported("--precision int8: this torch build has no oneDNN int8 CPU kernels")
        return
    if device.type == "cpu":
        native = cpu_native(precision) if cpu_native_override is None else cpu_native_override
        if not native:
            needs = "AVX512_BF16 or AMX" if precision == "bf16" else "AVX512_FP16 or AMX-FP16"
            raise PrecisionUnsupported(
                f"--precision {precision}: this CPU has no native {precision} instructions ({needs}); "
                f"{precision} would be emulated, slower than fp32. Use --precision fp32 (the default) "
                f"here, or a CPU with {needs}, or a GPU")
    elif device.type == "cuda" and precision == "bf16" and not cuda_native_bf16(device):
        major, minor = cuda_capability(device)
        raise PrecisionUnsupported(
            f"--precision bf16: {device} (compute capability {major}.{minor}) "
            f"has no native bf16 (it needs {CUDA_NATIVE_BF16[0]}.{CUDA_NATIVE_BF16[1]} or later) and would "
            "emulate it; use --precision fp16 or fp32")


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of `device` itself (not of the current device)."""
    return platforms.of(device).capability()


def cuda_native_bf16(device: torch.device) -> bool:
    """Whether this CUDA device computes bf16 natively. torch's is_bf16_supported() is not
    the question: it accepts emulated bf16 (a V100 or T4 says yes) and asks the current device."""
    return cuda_capability(device) >= CUDA_NATIVE_BF16


def resolve(precision: str, devices: list[torch.device]) -> str:
    """The precision a model runs in on `devices`: `auto` is bf16 where every device is a CUDA
    device with native bf16, else fp32; an explicit choice is kept (and checked by `check`)."""
    if precision != "auto":
        return precision
    native = all(d.type == "cuda" and cuda_native_bf16(d) for d in devices)
    return "bf16" if devices and native else "fp32"


def use_tf32(requested: list[tuple[str, torch.device]]) -> bool:
    """Let fp32 matmuls and convolutions use TF32 (process-wide: torch has no per-thread switch)
    when some model runs on CUDA and none there asked for fp32 itself. Returns whether it did."""
    on_cuda = [p for p, device in requested if device.type == "cuda"]
    wanted = bool(on_cuda) and "fp32" not in on_cuda
    if wanted:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return wanted


def cast_weights(model: torch.nn.Module, precision: str) -> int:
    """Cast the weights of the transformer's Linear layers (attention projections, feed-forward)
    and the LM head's dense layer to the compute dtype, once. Autocast casts an fp32 weight on
    every call (with inference_mode it caches nothing), the same cast each time, so the numbers
    do not change; the memory traffic and the device memory of the fp32 copies go. Embeddings
    (tied to the LM head's output), LayerNorms, the rotary tables and the contact head's
    regression stay fp32. Returns how many Linear layers were cast."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return 0
    linears = [m for layer in model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    linears.append(model.lm_head.dense)
    for linear in linears:
        linear.to(dtype)
    return len(linears)
