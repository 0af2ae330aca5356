"""Stopping at the deepest layer asked for: every layer's output equals fair-esm's full
forward, for every depth, and the layers above it are never run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import assert_close, reference

from esm2_wire.output_kinds import OutputKind
from service.engine.inputs import ModelInput
from service.engine.worker import ModelWorker
from service.models.forward import BatchPlan, forward

SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWY", "GGG"]
PER_LAYER = frozenset({OutputKind.MEAN, OutputKind.PER_TOKEN, OutputKind.BOS})


def _tokens(loaded, sequences):
    _, _, tokens = loaded.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    return tokens


def _layers_run(model) -> list[int]:
    """Indexes of the transformer layers a forward enters (their first layer norm is called),
    and -1 for the final layer norm."""
    entered = []
    for index, layer in enumerate(model.layers):
        layer.self_attn_layer_norm.register_forward_hook(lambda *_, i=index: entered.append(i))
    model.emb_layer_norm_after.register_forward_hook(lambda *_: entered.append(-1))
    return entered


@pytest.mark.parametrize("model", ["esm2-tiny", "esm2-8m"])
@pytest.mark.parametrize("fast_attention", [True, False])
def test_every_depth_equals_the_full_forward(reference_models, model, fast_attention):
    loaded = reference_models[model]
    n = loaded.num_layers
    refs = [reference(loaded, s) for s in SEQUENCES]
    tokens = _tokens(loaded, SEQUENCES)
    for k in range(n + 1):
        out = forward(loaded.model, tokens, BatchPlan(frozenset(range(k + 1)), PER_LAYER, fast_attention))
        assert sorted(out.representations) == list(range(k + 1))
        for row, (sequence, ref) in enumerate(zip(SEQUENCES, refs)):
            for layer in range(k + 1):
                rep = out.representations[layer][row, 1 : len(sequence) + 1].numpy()
                assert_close(rep, ref["per_token"][layer], f"{model} depth {k} layer {layer}")


def test_the_layers_above_the_deepest_asked_for_are_not_run(checkpoint_dir):
    from service.models.checkpoints import load

    loaded = load("esm2-8m", checkpoint_dir / "esm2_t6_8M_UR50D.pt")  # its own copy: hooks stay on it
    entered = _layers_run(loaded.model)
    tokens = _tokens(loaded, SEQUENCES)
    for layers, outputs, expected in [
        ({2}, PER_LAYER, [0, 1]),
        ({0}, {OutputKind.MEAN}, []),
        ({1, 4}, {OutputKind.BOS}, [0, 1, 2, 3]),
        ({6}, {OutputKind.MEAN}, [0, 1, 2, 3, 4, 5, -1]),  # the last layer: the final norm too
        ({1}, {OutputKind.MEAN, OutputKind.LOGITS}, [0, 1, 2, 3, 4, 5, -1]),  # logits need the whole pass
        ({1}, {OutputKind.MEAN, OutputKind.CONTACTS}, [0, 1, 2, 3, 4, 5, -1]),
    ]:
        entered.clear()
        forward(loaded.model, tokens, BatchPlan(frozenset(layers), frozenset(outputs)))
        assert entered == expected, (layers, outputs)


def test_a_batch_of_mixed_depths_gives_each_item_its_own_layers(reference_models):
    """Items asking for layers 1 and 5 in one batch: the pass runs 5 layers; each gets fair-esm's values."""
    loaded = reference_models["esm2-8m"]
    worker = ModelWorker({"esm2-8m": loaded}, torch.device("cpu"))
    items = [ModelInput("esm2-8m", loaded.tokenize(tuple(s)), PER_LAYER, (layer,), num_layers=loaded.num_layers)
             for s, layer in zip(SEQUENCES, (1, 5, 0))]
    results = worker.run(items)
    for sequence, item, result in zip(SEQUENCES, items, results):
        ref = reference(loaded, sequence)
        (layer,) = item.layers
        assert list(result.mean) == [layer]
        assert_close(result.mean[layer], ref["mean"][layer], f"mean {layer}")
        assert_close(result.bos[layer], ref["bos"][layer], f"bos {layer}")
        assert_close(result.per_token[layer], ref["per_token"][layer], f"per_token {layer}")
        assert np.isfinite(result.per_token[layer]).all()
