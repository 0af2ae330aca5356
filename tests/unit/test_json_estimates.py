"""The JSON size estimate (checked before any model work) tracks what rendering then writes."""

import numpy as np
import pytest

from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from service.api import json_limits, rendering

VOCAB = list("ACDEFGHIKLMNPQRSTVWY")


def _result(kinds, length, dim, layers, rng) -> ItemResult:
    result = ItemResult()
    for kind in kinds:
        if kind.per_layer:
            for layer in layers:
                shape = (length, dim) if kind is OutputKind.PER_TOKEN else (dim,)
                result.put(kind, rng.standard_normal(shape).astype(np.float32), layer)
        elif kind is OutputKind.LOGITS:
            result.put(kind, rng.standard_normal((length, len(VOCAB))).astype(np.float32))
        elif kind is OutputKind.ATTENTIONS:  # mostly 1e-3..1e-5, as real attention means
            result.put(kind, (rng.random((length, length)) * 1e-3).astype(np.float32))
        else:
            result.put(kind, rng.random((length, length)).astype(np.float32))
    return result


# ids in a fixed order: str() of a set follows string hashing, which differs between processes,
# and parallel workers must collect the same ids.
@pytest.mark.parametrize("kinds", [{k} for k in OutputKind] + [set(OutputKind)],
                         ids=lambda kinds: "+".join(sorted(kind.value for kind in kinds)))
def test_the_encode_estimate_is_within_a_quarter_of_the_rendered_size(kinds):
    rng = np.random.default_rng(0)
    lengths, dim, layers = [40, 75], 320, (0, 6)
    results = [_result(kinds, n, dim, layers, rng) for n in lengths]
    size = len(rendering.json_body([rendering.encode_json_result(i, r, VOCAB) for i, r in enumerate(results)]))
    estimate = json_limits.estimate_encode_bytes(lengths, frozenset(kinds), len(layers), dim, len(VOCAB))
    assert 0.75 < estimate / size < 1.25, (estimate, size)


def test_the_predict_estimate_is_within_a_quarter_of_the_rendered_size():
    rng = np.random.default_rng(1)
    tokens = [tuple("MK") + ("<mask>",) * 3 + tuple("LV" * 20)]
    result = ItemResult(logits=rng.standard_normal((len(tokens[0]), 20)).astype(np.float32))
    size = len(rendering.json_body([rendering.predict_json_result(0, result, tokens[0], VOCAB)]))
    estimate = json_limits.estimate_predict_bytes([len(tokens[0])], len(VOCAB))
    assert 0.75 < estimate / size < 1.25, (estimate, size)


def test_too_large_names_the_limit_and_the_streaming_rpc():
    message = json_limits.too_large(600 << 20, 512 << 20, estimated=True, stream_rpc="EncodeStream")
    assert "would be about 600 MiB, over this server's 512 MiB limit (--max-json-response-mb)" in message
    assert message.endswith("use the streaming gRPC RPC esm.v1.Esm2Service/EncodeStream")
