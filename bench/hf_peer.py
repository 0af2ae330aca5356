"""The Hugging Face peer: what most users would run instead of the service today.

`transformers`' `EsmModel` (embeddings) and `EsmForMaskedLM` (logits) with
`attn_implementation="sdpa"`, fed by `EsmTokenizer`, over sorted token-budget batches, the way a
user batches well in their own script. The weights are the benchmark's own random fair-esm
checkpoint, renamed to transformers' layout, so the peer computes the same function as the
service; `parity()` checks that it does.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from bench.baseline import extract_batches


def hf_config(loaded):
    from transformers import EsmConfig

    model, alphabet = loaded.model, loaded.alphabet
    return EsmConfig(
        vocab_size=len(alphabet.all_toks), hidden_size=model.embed_dim, num_hidden_layers=model.num_layers,
        num_attention_heads=model.attention_heads, intermediate_size=4 * model.embed_dim,
        max_position_embeddings=4098,  # positions are rotary; this only sizes a buffer
        position_embedding_type="rotary", token_dropout=model.token_dropout,
        emb_layer_norm_before=False, layer_norm_eps=1e-5, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=alphabet.padding_idx, mask_token_id=alphabet.mask_idx,
        cls_token_id=alphabet.cls_idx, eos_token_id=alphabet.eos_idx,
    )


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """fair-esm ESM2 parameter names -> transformers EsmForMaskedLM names."""
    sd = model.state_dict()
    out = {"esm.embeddings.word_embeddings.weight": sd["embed_tokens.weight"],
           "esm.encoder.emb_layer_norm_after.weight": sd["emb_layer_norm_after.weight"],
           "esm.encoder.emb_layer_norm_after.bias": sd["emb_layer_norm_after.bias"],
           "lm_head.dense.weight": sd["lm_head.dense.weight"], "lm_head.dense.bias": sd["lm_head.dense.bias"],
           "lm_head.layer_norm.weight": sd["lm_head.layer_norm.weight"],
           "lm_head.layer_norm.bias": sd["lm_head.layer_norm.bias"],
           "lm_head.decoder.weight": sd["lm_head.weight"], "lm_head.bias": sd["lm_head.bias"],
           "esm.contact_head.regression.weight": sd["contact_head.regression.weight"],
           "esm.contact_head.regression.bias": sd["contact_head.regression.bias"]}
    names = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
             "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
             "self_attn_layer_norm": "attention.LayerNorm", "fc1": "intermediate.dense", "fc2": "output.dense",
             "final_layer_norm": "LayerNorm"}
    for i in range(model.num_layers):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"esm.encoder.layer.{i}.{theirs}.{p}"] = sd[f"layers.{i}.{ours}.{p}"]
    return out


def tokenized_batches(tokenizer, sequences, toks_per_batch: int, device="cpu"):
    """esm-extract's sorted token-budget batches, each as (its sequences, EsmTokenizer's padded encoding)."""
    for indices in extract_batches(sequences, toks_per_batch):
        batch = [sequences[i] for i in indices]
        yield batch, tokenizer(batch, padding=True, return_tensors="pt").to(device)


class HfPeer:
    """EsmForMaskedLM (and its `.esm`, an EsmModel) with SDPA attention, plus EsmTokenizer."""

    def __init__(self, loaded, device: str = "cpu"):
        from transformers import EsmForMaskedLM, EsmTokenizer

        self.mlm = EsmForMaskedLM._from_config(hf_config(loaded), attn_implementation="sdpa")
        missing, unexpected = self.mlm.load_state_dict(hf_state_dict(loaded.model), strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq") and "position_ids" not in k]
        if missing or unexpected:
            raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
        self.mlm.eval().to(device)
        self.embedder = self.mlm.esm  # an EsmModel
        self.device = torch.device(device)
        with tempfile.TemporaryDirectory(prefix="esm-bench-hf-") as tmp:
            vocab = Path(tmp) / "vocab.txt"
            vocab.write_text("\n".join(loaded.alphabet.all_toks) + "\n")
            self.tokenizer = EsmTokenizer(str(vocab))

    def quantized(self) -> "HfPeer":
        """A copy whose encoder layers' Linear modules are int8, quantized exactly as the service's
        `--precision int8` quantizes fair-esm's (service.models.quantize)."""
        from service.models.quantize import quantize_linears

        peer = copy.copy(self)
        peer.mlm = copy.deepcopy(self.mlm)
        names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
        quantize_linears(peer.mlm, [f"esm.encoder.layer.{i}.{name}"
                                    for i in range(len(peer.mlm.esm.encoder.layer)) for name in names])
        peer.embedder = peer.mlm.esm
        return peer

    def mean_pass(self, sequences, toks_per_batch: int, autocast: torch.dtype | None = None) -> float:
        """Seconds for mean-of-last-layer embeddings of every sequence (EsmModel)."""
        return self._timed(sequences, toks_per_batch, autocast,
                           lambda encoded: self.embedder(**encoded).last_hidden_state,
                           lambda rows: rows.mean(0).clone())

    def logits_pass(self, sequences, toks_per_batch: int, autocast: torch.dtype | None = None) -> float:
        """Seconds for per-residue logits of every sequence (EsmForMaskedLM)."""
        return self._timed(sequences, toks_per_batch, autocast, lambda encoded: self.mlm(**encoded).logits,
                           lambda rows: rows.clone())

    @torch.inference_mode()
    def _timed(self, sequences, toks_per_batch: int, autocast, model, per_item) -> float:
        """Seconds to run `model` over the batches and `per_item` on each sequence's residue rows."""
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            for batch, encoded in tokenized_batches(self.tokenizer, sequences, toks_per_batch, self.device):
                out = model(encoded).float().cpu()
                for i, s in enumerate(batch):
                    per_item(out[i, 1 : len(s) + 1])
        _sync(self.device)
        return time.perf_counter() - start

    @torch.inference_mode()
    def parity(self, loaded, sequences) -> dict[str, float]:
        """Max |HF - stock fair-esm| of the last layer and the logits over `sequences`, one batch."""
        _, _, tokens = loaded.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
        encoded = self.tokenizer(list(sequences), padding=True, return_tensors="pt")
        if not torch.equal(encoded["input_ids"], tokens):
            raise RuntimeError("EsmTokenizer and fair-esm's batch converter disagree on the token ids")
        stock = loaded.model(tokens.to(self.device), repr_layers=[loaded.num_layers])
        ours = self.mlm(**encoded.to(self.device), output_hidden_states=True)
        rep_diff = logit_diff = 0.0
        for i, s in enumerate(sequences):
            rows = slice(1, len(s) + 1)
            rep_diff = max(rep_diff, (ours.hidden_states[-1][i, rows]
                                      - stock["representations"][loaded.num_layers][i, rows]).abs().max().item())
            logit_diff = max(logit_diff, (ours.logits[i, rows] - stock["logits"][i, rows]).abs().max().item())
        return {"max_abs_diff_representations": rep_diff, "max_abs_diff_logits": logit_diff}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
