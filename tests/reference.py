"""Direct fair-esm forward passes, one sequence alone: the ground truth for every test."""

from __future__ import annotations

import numpy as np
import torch

from esm2_wire.proto import pb

STANDARD_ORDER = "LAGVSERTIDPKQNFYMHWC"  # the 20 standard amino acids in ESM-2 alphabet order

# fp32 CPU. Float32 rounding is relative to the magnitudes a tensor holds: fair-esm itself
# differs from itself by ~1.5e-5 between batched and solo runs on logits that reach |60|
# with random weights. So: elementwise 1e-5 relative, plus 1e-5 absolute scaled by the
# tensor's largest magnitude (when that exceeds 1), for entries near zero.
RTOL = 1e-5
ATOL = 1e-5


def reference(loaded, sequence: str, layers=None) -> dict:
    """All outputs of `sequence` from fair-esm's stock ESM2.forward, residues only.

    `sequence` may contain `<mask>`; fair-esm's batch converter tokenizes it.
    """
    model, alphabet = loaded.model, loaded.alphabet
    n = model.num_layers
    layers = list(range(n + 1)) if layers is None else layers
    _, _, tokens = alphabet.get_batch_converter()([("x", sequence)])
    with torch.no_grad():
        out = model(tokens, repr_layers=layers, return_contacts=True)
    L = tokens.shape[1] - 2
    columns = [alphabet.get_idx(a) for a in STANDARD_ORDER]
    reps = {k: v[0].numpy() for k, v in out["representations"].items()}
    return {
        "mean": {k: v[1 : L + 1].mean(0) for k, v in reps.items()},
        "bos": {k: v[0] for k, v in reps.items()},
        "per_token": {k: v[1 : L + 1] for k, v in reps.items()},
        "logits": out["logits"][0, 1 : L + 1][:, columns].numpy(),
        "contacts": out["contacts"][0].numpy(),
        "attentions": out["attentions"][0, :, :, 1 : L + 1, 1 : L + 1].mean((0, 1)).numpy(),
        "length": L,
    }


def assert_close(actual, expected, what: str = "") -> None:
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * scale, err_msg=what)


def matrix(message) -> np.ndarray:
    """esm.v1.Matrix -> numpy."""
    return np.asarray(message.values, dtype=np.float32).reshape(message.rows, message.cols)


SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "ACDEFGHIKLMNPQRSTVWYBXZUO-", "G" * 3, "MSLLTEVETPIRNEWGCRCNDSSDPLVVAASIIGILHLILWILDRLFFKCIYRFFEHGLKRG"]
INCLUDE_ALL = ["mean", "per_token", "bos", "contacts", "logits", "attentions"]


def check_result(result, ref, layers, include):
    """An EncodeResult carries exactly the `include`d outputs at `layers`, each equal to `ref`."""
    assert [e.layer for e in result.embeddings] == (layers if "mean" in include else [])
    assert [e.layer for e in result.bos_embeddings] == (layers if "bos" in include else [])
    assert [e.layer for e in result.per_token_embeddings] == (layers if "per_token" in include else [])
    for e in result.embeddings:
        assert_close(e.embedding, ref["mean"][e.layer], f"mean layer {e.layer}")
    for e in result.bos_embeddings:
        assert_close(e.embedding, ref["bos"][e.layer], f"bos layer {e.layer}")
    for e in result.per_token_embeddings:
        assert_close(matrix(e.embeddings), ref["per_token"][e.layer], f"per_token layer {e.layer}")
    for key in ("contacts", "attentions", "logits"):
        assert result.HasField(key) == (key in include), key
        if key in include:
            assert_close(matrix(getattr(result, key)), ref[key], key)
    if "logits" in include:
        assert list(result.vocab_tokens) == list("LAGVSERTIDPKQNFYMHWC")
    else:
        assert not result.vocab_tokens


# ---- scores computed directly on fair-esm (log_prob, Score) -------------------------------------
COLUMN = {a: i for i, a in enumerate(STANDARD_ORDER)}


def _logits(loaded, sequence: str) -> torch.Tensor:
    """fair-esm's stock forward, one sequence alone: logits of the 20 standard amino acids, [L, 20]."""
    _, _, tokens = loaded.alphabet.get_batch_converter()([("x", sequence)])
    with torch.no_grad():
        logits = loaded.model(tokens)["logits"][0, 1:-1]
    return logits[:, [loaded.alphabet.get_idx(a) for a in STANDARD_ORDER]]


def direct_log_prob(loaded, sequence: str) -> float:
    """BioLM's log_prob: one unmasked pass, log-softmax over the 20, the residues present summed."""
    log_probs = torch.log_softmax(_logits(loaded, sequence), dim=-1)
    return float(sum(log_probs[i, COLUMN[a]] for i, a in enumerate(sequence) if a in COLUMN))


def masked_log_probs(loaded, sequence: str, position: int) -> torch.Tensor:
    """Log-softmax over the 20 at the 1-based `position`, masked alone."""
    masked = sequence[: position - 1] + "<mask>" + sequence[position:]
    return torch.log_softmax(_logits(loaded, masked)[position - 1].double(), dim=-1)


def direct_masked_marginal(loaded, sequence: str, variant: str) -> float:
    total = 0.0
    for mutation in variant.split(":"):
        wt, position, mt = mutation[0], int(mutation[1:-1]), mutation[-1]
        lp = masked_log_probs(loaded, sequence, position)
        total += float(lp[COLUMN[mt]] - lp[COLUMN[wt]])
    return total


def direct_wt_marginal(loaded, sequence: str, variant: str) -> float:
    lp = torch.log_softmax(_logits(loaded, sequence).double(), dim=-1)
    return sum(float(lp[int(m[1:-1]) - 1, COLUMN[m[-1]]] - lp[int(m[1:-1]) - 1, COLUMN[m[0]]])
               for m in variant.split(":"))


def mutant_of(sequence: str, variant: str) -> str:
    letters = list(sequence)
    for m in variant.split(":"):
        letters[int(m[1:-1]) - 1] = m[-1]
    return "".join(letters)


def direct_pll(loaded, sequence: str) -> float:
    return sum(float(masked_log_probs(loaded, sequence, p)[COLUMN[a]])
               for p, a in enumerate(sequence, start=1) if a in COLUMN)


def score_request(model: str, items, method: str = "") -> pb.ScoreRequest:
    return pb.ScoreRequest(model=model, params=pb.ScoreParams(method=method),
                           items=[pb.ScoreItem(sequence=s, variants=v) for s, v in items])
