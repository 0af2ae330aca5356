"""int8 on CPU (`precision = "int8"`): the transformer layers' Linear modules in int8.

Dynamic quantization: each Linear's weight is quantized once, per output channel (symmetric
int8); its input is quantized on every call, over the whole batch's tensor (one uint8 scale
and zero point measured from that tensor), multiplied in int8 with int32 accumulation
(fbgemm / oneDNN kernels, AVX2 and up) and dequantized to fp32. That is 6 of a layer's
7 matrix products (q, k, v, out, fc1, fc2); the attention itself (QK^T, softmax, V), the
layer norms, the rotary embedding, the LM head and the contact head stay fp32.

Consequences callers should know (README "Choosing int8"): outputs differ from fp32 by the
figures in BENCHMARKS.md's accuracy tables, and they depend slightly on the batch an item ran
in, since the activation scale is measured over the whole batch (padding rows included).

Why `torch.ao.quantization.quantize_dynamic`, which torch has deprecated in favour of
torchao: torchao 0.18's `Int8DynamicActivationInt8WeightConfig` on this torch (2.13, CPU,
eager) ran a [1024, 480] x [480, 1920] Linear 20x slower than fp32 on the project's AVX2
machine (it has no eager int8 CPU kernel; its fast path needs torch.compile), where
quantize_dynamic's fbgemm kernel ran it faster than fp32. Replace it with torchao's
`quantize_` once torchao's eager CPU int8 path is at least as fast as this one (re-measure
with `python -m bench.run --cases int8`), or before torch removes torch.ao.quantization.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# The Linear modules of one fair-esm TransformerLayer that are quantized, by attribute path.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")


class Int8Unsupported(RuntimeError):
    """This torch build has no int8 CPU kernels (no quantized engine)."""


def engine() -> str | None:
    """The quantized engine int8 runs on: x86 (fbgemm + oneDNN) where present, else whichever this
    build has; None where it has none."""
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    for preferred in ("x86", "fbgemm", "onednn", "qnnpack"):
        if preferred in engines:
            return preferred
    return None


def quantize_layers(model: nn.Module) -> nn.Module:
    """Replace, in place, the Linear modules of `model.layers` (a fair-esm ESM2 on the CPU) by
    dynamically quantized int8 ones; return `model`."""
    return quantize_linears(model, [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in LAYER_LINEARS])


def quantize_linears(model: nn.Module, names) -> nn.Module:
    """Quantize, in place, the Linear modules of `model` at the dotted `names` (weights int8 per
    output channel, inputs per call); return `model`. The benchmark applies it to Hugging Face's
    EsmModel too, so that both sides are compared under the same quantization."""
    chosen = engine()
    if chosen is None:
        raise Int8Unsupported("--precision int8: this torch build has no quantized CPU engine")
    torch.backends.quantized.engine = chosen
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # its deprecation notice; the docstring says why it is used
        warnings.simplefilter("ignore")
        quantize_dynamic(model, dict.fromkeys(names, per_channel_dynamic_qconfig), inplace=True)
    return model


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, torch.ao.nn.quantized.dynamic.Linear)
