"""Reduced precision on CPU: refused where the processor would emulate it, close to fp32
where it runs, and reported in ListModels."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from support import REPO
from esm2_wire.output_kinds import OutputKind
from service.models import precision
from esm2_wire.proto import pb
from service.models.forward import BatchPlan, forward
from esm2_wire.proto import pb

# bf16 keeps 8 bits of mantissa (~0.4% per rounding); over the 8M shape's 6 layers the
# last-layer embeddings stay within 2% of the largest fp32 value, and their means point the
# same way (cosine >= 0.999).
BF16_REL_TOLERANCE = 0.02
BF16_MIN_COSINE = 0.999
BF16_MIN_TOP1_AGREEMENT = 0.95


def test_reduced_precision_refused_where_the_cpu_lacks_it():
    cpu = torch.device("cpu")
    with pytest.raises(precision.PrecisionUnsupported, match=r"no native bf16 instructions \(AVX512_BF16 or AMX\)"):
        precision.check("bf16", cpu, cpu_native_override=False)
    with pytest.raises(precision.PrecisionUnsupported, match=r"AVX512_FP16 or AMX-FP16.*--precision fp32"):
        precision.check("fp16", cpu, cpu_native_override=False)
    precision.check("bf16", cpu, cpu_native_override=True)
    precision.check("fp32", cpu, cpu_native_override=False)  # fp32 is never refused


def test_cpu_probe_agrees_with_the_processor_flags():
    flags = precision.cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        assert precision.cpu_native("bf16")
    if not ({"avx512_bf16", "amx_bf16", "amx_tile"} & flags) and flags:
        assert not precision.cpu_native("bf16")


def test_server_refuses_emulated_bf16_at_start_up(tmp_path, tiny_checkpoint):
    """Before loading anything: exit 2 and a message that names the flag and what is missing."""
    proc = subprocess.run(
        [sys.executable, "-m", "service.server", "--models", "esm2-tiny", "--checkpoint",
         f"esm2-tiny={tiny_checkpoint}", "--port", "0", "--metrics-port", "0", "--precision", "bf16",
         "--simulate-cpu-native", "absent"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--precision bf16: this CPU has no native bf16 instructions (AVX512_BF16 or AMX)" in proc.stderr
    assert "loaded esm2-tiny" not in proc.stderr  # refused before the slow part


def test_bf16_forward_is_close_to_fp32(reference_models):
    """The bf16 autocast path (whatever the CPU: the arithmetic is the same, only the speed
    differs) against fp32 on the 8M shape, at the stated tolerances."""
    loaded = reference_models["esm2-8m"]
    sequences = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 4, "GSHMSLFDFFKNKGSAAATPAPEPSEKDIL"]
    _, _, tokens = loaded.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    plan = BatchPlan(layers=frozenset({loaded.num_layers}), outputs=frozenset({OutputKind.LOGITS}))
    fp32 = forward(loaded.model, tokens, plan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = forward(loaded.model, tokens, plan)
    for row, s in enumerate(sequences):
        ref = fp32.representations[loaded.num_layers][row, 1 : len(s) + 1]
        low = bf16.representations[loaded.num_layers][row, 1 : len(s) + 1].float()
        assert not torch.equal(ref, low), "autocast did not change the arithmetic"
        assert (low - ref).abs().max() <= BF16_REL_TOLERANCE * ref.abs().max()
        cosine = torch.nn.functional.cosine_similarity(ref.mean(0), low.mean(0), dim=0)
        assert cosine >= BF16_MIN_COSINE
        top1 = fp32.logits[row, 1 : len(s) + 1].argmax(-1) == bf16.logits[row, 1 : len(s) + 1].argmax(-1)
        assert top1.float().mean() >= BF16_MIN_TOP1_AGREEMENT


def test_list_models_reports_the_precision(stub):
    for info in stub.ListModels(pb.ListModelsRequest()).models:
        assert info.precision == "fp32"  # the default: equal to fair-esm
