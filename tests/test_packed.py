"""The packed forward (no padding; attention per sequence) equals the padded forward and
fair-esm, for every output it serves, on CPU: the same code the GPU path runs around its
attention kernel."""

from __future__ import annotations

import pytest
import torch
from reference import assert_close, reference

from esm2_wire.output_kinds import OutputKind
from service.models.forward import BatchPlan, forward
from service.models.packed import pack, packed_forward

# Different lengths (so the padded batch pads), masked tokens (token dropout's rescaling is per sequence).
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYBXZUO", "GGG", "MK<mask>AYIAKQR<mask>",
             "MSLLTEVETPIRNEWGCRCNDSSDPLVVAASIIGILHLILWILDRLFFKCIYRFFEHGLKRG"]
SERVED = frozenset({OutputKind.MEAN, OutputKind.PER_TOKEN, OutputKind.BOS, OutputKind.LOGITS})


def _batch(loaded, sequences):
    _, _, padded = loaded.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    rows = [row[row != loaded.alphabet.padding_idx] for row in padded]
    return padded, rows


@pytest.mark.parametrize("model", ["esm2-tiny", "esm2-8m"])
def test_packed_equals_padded_and_fair_esm_for_every_output(reference_models, model):
    loaded = reference_models[model]
    n = loaded.num_layers
    plan = BatchPlan(frozenset(range(n + 1)), SERVED)
    padded_tokens, rows = _batch(loaded, SEQUENCES)
    padded = forward(loaded.model, padded_tokens, plan)
    tokens, cu_seqlens = pack(rows)
    packed = packed_forward(loaded.model, tokens, cu_seqlens, plan)
    assert sorted(packed.representations) == list(range(n + 1))
    assert packed.logits.shape == (len(tokens), 20)
    for i, sequence in enumerate(SEQUENCES):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        length = end - start
        ref = reference(loaded, sequence)
        residues = ref["length"]
        for layer in range(n + 1):
            ours = packed.representations[layer][start:end]
            assert_close(ours, padded.representations[layer][i, :length], f"{model} layer {layer} vs padded")
            assert_close(ours[1 : residues + 1], ref["per_token"][layer], f"{model} layer {layer} vs fair-esm")
            assert_close(ours[0], ref["bos"][layer], f"{model} BOS layer {layer}")
        assert_close(packed.logits[start:end], padded.logits[i, :length], f"{model} logits vs padded")
        assert_close(packed.logits[start + 1 : start + residues + 1], ref["logits"], f"{model} logits vs fair-esm")


def test_packed_stops_at_the_deepest_layer_asked_for(reference_models):
    loaded = reference_models["esm2-8m"]
    padded_tokens, rows = _batch(loaded, SEQUENCES[:3])
    tokens, cu_seqlens = pack(rows)
    for k in range(loaded.num_layers):
        plan = BatchPlan(frozenset({k}), frozenset({OutputKind.MEAN}))
        packed = packed_forward(loaded.model, tokens, cu_seqlens, plan)
        padded = forward(loaded.model, padded_tokens, plan)
        assert list(packed.representations) == [k]
        for i in range(3):
            start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
            assert_close(packed.representations[k][start:end], padded.representations[k][i, : end - start], f"{k}")


def test_a_sequence_alone_and_packed_with_others_gets_the_same_values(reference_models):
    """Nothing leaks between packed neighbours: attention stays within each sequence."""
    loaded = reference_models["esm2-8m"]
    plan = BatchPlan(frozenset({loaded.num_layers}), frozenset({OutputKind.PER_TOKEN}))
    _, rows = _batch(loaded, SEQUENCES)
    together = packed_forward(loaded.model, *pack(rows), plan).representations[loaded.num_layers]
    alone = packed_forward(loaded.model, *pack(rows[1:2]), plan).representations[loaded.num_layers]
    start = len(rows[0])
    assert_close(together[start : start + len(rows[1])], alone, "sequence 1")


def test_attention_maps_keep_the_padded_path(reference_models):
    loaded = reference_models["esm2-tiny"]
    tokens, cu_seqlens = pack(_batch(loaded, SEQUENCES[:2])[1])
    for kind in (OutputKind.CONTACTS, OutputKind.ATTENTIONS):
        with pytest.raises(ValueError, match="no attention maps"):
            packed_forward(loaded.model, tokens, cu_seqlens, BatchPlan(frozenset(), frozenset({kind})))
    assert torch.equal(cu_seqlens, torch.tensor([0, 24, 51], dtype=torch.int32))


def test_the_default_layout_is_packed_on_cpus_and_padded_on_gpus():
    from service.config import ServerSettings, resolve_layout

    assert ServerSettings.model_fields["layout"].default == "auto"
    assert resolve_layout("auto", "cpu") == "packed" and resolve_layout("auto", "cuda") == "padded"
    assert [resolve_layout(choice, device) for choice in ("padded", "packed") for device in ("cpu", "cuda")] == \
        ["padded", "padded", "packed", "packed"]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_a_server_with_either_layout_answers_as_fair_esm(tmp_path, checkpoint_dir, reference_models, layout):
    """--layout packed (what auto picks on a CPU) and padded: every output equals fair-esm's;
    contacts and attentions take the exact path."""
    from reference import INCLUDE_ALL, check_result, matrix
    from support import ServerProcess, encode_request

    from esm2_wire.proto import pb

    encodable = [s for s in SEQUENCES if "<mask>" not in s]
    masked = [s for s in SEQUENCES if "<mask>" in s]
    server = ServerProcess(tmp_path, "--models", "esm2-8m", "--model-dir", str(checkpoint_dir),
                           "--layout", layout).wait_ready()
    try:
        served = server.stub.Encode(encode_request("esm2-8m", encodable, ["mean", "per_token", "bos", "logits"],
                                                   [0, 3, -1]))
        predicted = server.stub.Predict(pb.PredictRequest(model="esm2-8m",
                                                          items=[pb.SequenceItem(sequence=s) for s in masked]))
        maps = server.stub.Encode(encode_request("esm2-8m", encodable[:2], INCLUDE_ALL, [2]))
        batches = server.metrics().get('esm_batches_total{model="esm2-8m"}', 0)
    finally:
        server.stop()
    loaded = reference_models["esm2-8m"]
    for sequence, result in zip(encodable, served.results):
        check_result(result, reference(loaded, sequence), [0, 3, 6], {"mean", "per_token", "bos", "logits"})
    for sequence, result in zip(masked, predicted.results):  # token dropout's per-sequence rescaling
        assert_close(matrix(result.logits), reference(loaded, sequence, layers=[])["logits"], "predict logits")
    for sequence, result in zip(encodable, maps.results):
        check_result(result, reference(loaded, sequence), [2], set(INCLUDE_ALL))
    assert batches >= 2
