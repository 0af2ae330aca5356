"""int8 on CPU (`precision = "int8"`): the transformer layers' Linear modules in int8.

Dynamic quantization: each Linear's weight is quantized once, per output channel (symmetric
int8); its input is quantized on every call, over the whole batch's tensor (one scale and zero
point measured from that tensor's min and max), multiplied in int8 with int32 accumulation by
oneDNN and dequantized to fp32. That is 6 of a layer's 7 matrix products (q, k, v, out, fc1,
fc2); the attention itself (QK^T, softmax, V), the layer norms, the rotary embedding, the LM
head and the contact head stay fp32. The forward pass (service.models.forward) asks for two
fusions the kernel offers: fc1's exact (erf) GELU and the residual additions after out and fc2
run in the matmul's epilogue instead of as passes of their own over the activations.

Activations use 7 bits (0..127), as PyTorch's own x86 dynamic quantization does on CPUs
without VNNI: there the u8 x s8 products are summed in pairs into int16, which 8-bit inputs
can overflow. Every machine uses 7 bits, so that int8 results do not depend on the CPU.

Consequences callers should know (docs/benchmarks.md, "Choosing int8"): outputs differ from fp32 by the
figures in BENCHMARKS.md's accuracy tables, and they depend slightly on the batch an item ran
in, since the activation scale is measured over the whole batch (padding rows included).

Why oneDNN's `onednn::qlinear_pointwise` (the kernel torch.compile's x86 int8 lowering emits)
rather than a quantization library: on this torch (2.13, CPU, eager) torchao 0.18's
`Int8DynamicActivationInt8WeightConfig` ran a [1024, 480] x [480, 1920] Linear 20x slower than
fp32 on the project's AVX2 machine (it has no eager int8 CPU kernel; its fast path needs
torch.compile), and `torch.ao.quantization.quantize_dynamic` (fbgemm, deprecated) cannot fuse
the GELU or the residual: the whole 35M forward ran 1.3x fp32 with it, against 1.6-1.8x with
this one (BENCHMARKS.md). The activation is quantized with `torch.quantize_per_tensor`, also
deprecated, because it is the one single-pass quantizing kernel in eager torch; its uint8
bytes are then read in place. Re-measure (`python -m bench.run --cases int8`) and move to
torchao once its eager CPU int8 path is as fast, or before torch removes quantized tensors.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# The Linear modules of one fair-esm TransformerLayer that are quantized, by attribute path.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")


class Int8Unsupported(RuntimeError):
    """This torch build has no oneDNN int8 CPU kernels."""


# 7-bit activations (see the module docstring); weights use the symmetric int8 range.
ACTIVATION_LEVELS = 127
WEIGHT_LEVELS = 127


def engine() -> str | None:
    """The int8 kernel library int8 runs on: "onednn" where this torch build has it, else None."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return None
    return "onednn"


def _quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """x (fp32, any shape) as uint8 codes in 0..ACTIVATION_LEVELS, with its scale and zero point
    (asymmetric, over the whole tensor, with 0.0 exactly representable)."""
    lo, hi = torch.aminmax(x)
    lo, hi = min(lo.item(), 0.0), max(hi.item(), 0.0)
    scale = max(hi - lo, 1e-8) / ACTIVATION_LEVELS
    zero_point = min(ACTIVATION_LEVELS, max(0, round(-lo / scale)))
    with warnings.catch_warnings():  # its deprecation notice; the module docstring says why it is used
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    # The quint8 tensor's bytes, read as uint8 in place (int_repr() would copy them: a third of
    # the quantization's time).
    codes = torch.empty(0, dtype=torch.uint8, device=x.device)
    codes.set_(quantized.untyped_storage(), quantized.storage_offset(), quantized.shape, quantized.stride())
    return codes, scale, zero_point


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 and whose input is quantized on every call; fp32 out.

    `forward` is the plain Linear (fair-esm's own layers call it); `gelu` and `add_to` are the
    fused forms the fast path uses."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=1e-12) / WEIGHT_LEVELS  # [out], per output channel
        codes = torch.round(weight / scale[:, None]).clamp_(-WEIGHT_LEVELS, WEIGHT_LEVELS).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(self.out_features, dtype=torch.int64))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        # oneDNN's own blocked layout: an opaque tensor, packed once (not state: it cannot be saved).
        self.packed_weight = torch.ops.onednn.qlinear_prepack(codes, None)
        # Still the model's parameters, though held outside parameters() (ListModels counts them).
        self.quantized_parameters = codes.numel() + (0 if linear.bias is None else linear.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, "none")

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(self(x)), fair-esm's exact (erf) GELU, in the matmul's epilogue."""
        return self._matmul(x, "gelu")

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x), the addition in the matmul's epilogue (a new tensor; residual is
        left as it was, since the forward pass may have kept it as a layer's representation)."""
        codes, scale, zero_point = _quantize_activation(x)
        return torch.ops.onednn.qlinear_pointwise.binary(
            codes, scale, zero_point, self.packed_weight, self.weight_scale, self.weight_zero_point,
            residual, self.bias, 1.0, 0, torch.float32, 1.0, 0, "add", 1.0, "none", [], "")

    def _matmul(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        codes, scale, zero_point = _quantize_activation(x)
        return torch.ops.onednn.qlinear_pointwise(
            codes, scale, zero_point, self.packed_weight, self.weight_scale, self.weight_zero_point,
            self.bias, 1.0, 0, torch.float32, activation, [], "none")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, 7-bit inputs"


def quantize_layers(model: nn.Module) -> nn.Module:
    """Replace, in place, the Linear modules of `model.layers` (a fair-esm ESM2 on the CPU) by
    Int8Linear ones; return `model`."""
    return quantize_linears(model, [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in LAYER_LINEARS])


def quantize_linears(model: nn.Module, names) -> nn.Module:
    """Replace, in place, the Linear modules of `model` at the dotted `names` by Int8Linear ones;
    return `model`. The benchmark applies it to Hugging Face's EsmModel too, so that both sides
    are compared under the same quantization."""
    if engine() is None:
        raise Int8Unsupported("--precision int8: this torch build has no oneDNN int8 CPU kernels")
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, Int8Linear(getattr(parent, attribute)))
    return model


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, Int8Linear)
