"""int8 on CPU: only the transformer layers' Linear modules are quantized; the service's
forward over them equals fair-esm's own forward over the same quantized modules; the
outputs stay within the stated distance of fp32; a models file opts one model in, and
ListModels and the result cache tell int8 from fp32."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import assert_close, matrix, reference

from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb
from service.models import precision
from service.models.forward import BatchPlan, forward
from service.models.quantize import (ACTIVATION_LEVELS, LAYER_LINEARS, Int8Linear, _quantize_activation,
                                     is_quantized, quantize_layers)
from support import ServerProcess, encode_request

SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 4, "GSHMSLFDFFKNKGSAAATPAPEPSEKDIL", "ACDEFGHIKLMNPQRSTVWY"]
# Against fp32, on the 8M shape with random weights (BENCHMARKS.md has the tables at 8M-150M):
# the mean embeddings point the same way, the logits mostly agree on the top residue, and
# every value is within a few percent of the largest fp32 value.
INT8_MIN_COSINE = 0.999
INT8_MIN_TOP1_AGREEMENT = 0.9
INT8_REL_TOLERANCE = 0.05
# Over the same int8 modules, the exact path (fair-esm's own layers) equals fair-esm to fp32
# rounding. The fused SDPA rounds differently, and a difference of one float rounding just
# before an activation is quantized can move that value by one int8 step: agreement is then
# to about one step of the activations (measured: up to 1.6% of the largest value).
SAME_QUANTIZATION_FAST_RTOL = 3e-2


@pytest.fixture(scope="module")
def int8_8m(reference_models):
    return quantize_layers(copy.deepcopy(reference_models["esm2-8m"].model))


def test_only_the_layers_linear_modules_are_quantized(int8_8m):
    for layer in int8_8m.layers:
        for path in LAYER_LINEARS:
            assert is_quantized(layer.get_submodule(path)), path
        for norm in (layer.self_attn_layer_norm, layer.final_layer_norm):
            assert norm.weight.dtype == torch.float32
    assert not is_quantized(int8_8m.lm_head.dense) and int8_8m.lm_head.dense.weight.dtype == torch.float32
    assert not is_quantized(int8_8m.contact_head.regression)
    assert int8_8m.embed_tokens.weight.dtype == torch.float32
    assert sum(map(is_quantized, int8_8m.modules())) == len(LAYER_LINEARS) * int8_8m.num_layers


def test_activations_are_quantized_to_7_bits_with_zero_exact():
    """7-bit codes (0..127: no int16 overflow in AVX2's u8 x s8 pair sums), one scale for the
    whole tensor, every value within half a step of its code, and 0.0 (padding) exact."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 40) * 3 + 1
    x[0, :5] = 0.0
    codes, scale, zero_point = _quantize_activation(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert int(codes.max()) <= ACTIVATION_LEVELS and 0 <= zero_point <= ACTIVATION_LEVELS
    dequantized = (codes.float() - zero_point) * scale
    assert (dequantized - x).abs().max() <= scale / 2 + 1e-6
    assert torch.equal(dequantized[0, :5], torch.zeros(5, 40))
    assert abs(scale - (x.max() - x.min()).item() / ACTIVATION_LEVELS) < 1e-6


def test_int8_linear_and_its_fused_forms():
    """Int8Linear is within int8's distance of the fp32 Linear; its GELU and residual forms equal
    the unfused arithmetic over the same int8 matmul, and the residual is left as it was."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160)
    int8 = Int8Linear(linear)
    x, residual = torch.randn(2, 33, 96), torch.randn(2, 33, 160)
    kept = residual.clone()
    with torch.inference_mode():
        exact, low = linear(x), int8(x)
        assert not torch.allclose(exact, low, atol=1e-4), "the layer did not compute in int8"
        assert (low - exact).abs().max() <= INT8_REL_TOLERANCE * exact.abs().max()
        torch.testing.assert_close(int8.gelu(x), torch.nn.functional.gelu(low), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(int8.add_to(residual, x), residual + low, rtol=1e-5, atol=1e-5)
    assert torch.equal(residual, kept)


def test_int8_forward_equals_fair_esm_over_the_same_quantized_layers(reference_models, int8_8m):
    """fair-esm's own ESM2.forward over the quantized copy is the reference for the int8 path."""
    loaded = reference_models["esm2-8m"]
    int8_loaded = copy.copy(loaded)
    int8_loaded.model = int8_8m
    for sequence in SEQUENCES:
        ref = reference(int8_loaded, sequence)
        _, _, tokens = loaded.alphabet.get_batch_converter()([("x", sequence)])
        for fast in (True, False):
            outputs = {OutputKind.LOGITS} | ({OutputKind.CONTACTS} if not fast else set())
            out = forward(int8_8m, tokens, BatchPlan(frozenset({3, 6}), frozenset(outputs), fast))
            n = len(sequence)
            actual = {f"per_token {layer}": (out.representations[layer][0, 1 : n + 1], ref["per_token"][layer])
                      for layer in (3, 6)}
            actual["logits"] = out.logits[0, 1 : n + 1], ref["logits"]
            if not fast:
                actual["contacts"] = out.contacts[0], ref["contacts"]
            for what, (ours, theirs) in actual.items():
                if fast:
                    scale = np.abs(theirs).max()
                    np.testing.assert_allclose(ours, theirs, atol=SAME_QUANTIZATION_FAST_RTOL * scale, err_msg=what)
                else:
                    assert_close(ours, theirs, f"exact path {what}")


def test_int8_is_close_to_fp32(reference_models, int8_8m):
    loaded = reference_models["esm2-8m"]
    _, _, tokens = loaded.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(SEQUENCES)])
    plan = BatchPlan(frozenset({loaded.num_layers}), frozenset({OutputKind.LOGITS}))
    fp32, int8 = forward(loaded.model, tokens, plan), forward(int8_8m, tokens, plan)
    for row, s in enumerate(SEQUENCES):
        ref = fp32.representations[loaded.num_layers][row, 1 : len(s) + 1]
        low = int8.representations[loaded.num_layers][row, 1 : len(s) + 1]
        assert not torch.allclose(ref, low, rtol=1e-4, atol=1e-4), "int8 did not change the arithmetic"
        assert (low - ref).abs().max() <= INT8_REL_TOLERANCE * ref.abs().max()
        assert torch.nn.functional.cosine_similarity(ref.mean(0), low.mean(0), dim=0) >= INT8_MIN_COSINE
        top1 = fp32.logits[row, 1 : len(s) + 1].argmax(-1) == int8.logits[row, 1 : len(s) + 1].argmax(-1)
        assert top1.float().mean() >= INT8_MIN_TOP1_AGREEMENT


def test_int8_is_for_cpus():
    precision.check("int8", torch.device("cpu"))
    with pytest.raises(precision.PrecisionUnsupported, match=r"--precision int8 is for CPUs .* use --precision bf16"):
        precision.check("int8", torch.device("cuda"))


def test_a_models_file_opts_one_model_into_int8(tmp_path, checkpoint_dir, tiny_checkpoint, reference_models):
    """esm2-8m in int8 beside esm2-tiny in fp32 on one server: each reports its precision; the
    int8 model answers within int8's distance of fp32 (contacts too), the fp32 one equals fair-esm."""
    models = tmp_path / "models.toml"
    models.write_text(f'[models.esm2-8m]\nsource = "{checkpoint_dir / "esm2_t6_8M_UR50D.pt"}"\nprecision = "int8"\n\n'
                      f'[models.esm2-tiny]\nsource = "{tiny_checkpoint}"\n')
    server = ServerProcess(tmp_path, "--models-file", str(models)).wait_ready()
    try:
        info = {m.name: m for m in server.stub.ListModels(pb.ListModelsRequest()).models}
        int8 = server.stub.Encode(encode_request("esm2-8m", SEQUENCES, ["mean", "logits", "contacts"], [-1]))
        fp32 = server.stub.Encode(encode_request("esm2-tiny", SEQUENCES[1:], ["mean"], [-1]))
    finally:
        server.stop()
    assert info["esm2-8m"].precision == "int8" and info["esm2-tiny"].precision == "fp32"
    assert info["esm2-8m"].parameters == reference_models["esm2-8m"].parameters  # the packed weights count
    for sequence, result in zip(SEQUENCES, int8.results):
        ref = reference(reference_models["esm2-8m"], sequence)
        mean = np.asarray(result.embeddings[0].embedding)
        cosine = mean @ ref["mean"][6] / (np.linalg.norm(mean) * np.linalg.norm(ref["mean"][6]))
        assert not np.allclose(mean, ref["mean"][6], rtol=1e-5, atol=1e-5), "the server did not compute in int8"
        assert cosine >= INT8_MIN_COSINE
        logits = matrix(result.logits)
        assert (logits.argmax(-1) == ref["logits"].argmax(-1)).mean() >= INT8_MIN_TOP1_AGREEMENT
        np.testing.assert_allclose(matrix(result.contacts), ref["contacts"], atol=0.05)
    for sequence, result in zip(SEQUENCES[1:], fp32.results):
        assert_close(result.embeddings[0].embedding, reference(reference_models["esm2-tiny"], sequence)["mean"][2])


def test_the_cache_scope_tells_int8_from_fp32_and_packed_from_padded(tiny_checkpoint, reference_models):
    from service.config import ModelSpec
    from service.models.served import ServedModel
    from service.server import cache_scope

    def scope(**settings) -> str:
        spec = ModelSpec(name="esm2-tiny", precision="fp32").model_copy(update=settings)
        return cache_scope(ServedModel(spec, [torch.device("cpu")], reference_models["esm2-tiny"]))

    assert scope() != scope(precision="int8")
    assert scope() != scope(layout="packed")
