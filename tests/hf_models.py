"""Hugging Face ESM-2 checkpoints for the tests, written and run by transformers itself.

Random weights at a tiny shape and the real 8M/35M shapes (as service.models.random_checkpoints
makes fair-esm ones), fair-esm weights converted to HF format, and transformers' own
EsmForMaskedLM forward of one sequence alone: the ground truth for HF-served outputs.
transformers is a test dependency only; the server reads these files without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

from reference import STANDARD_ORDER
from service.models.checkpoints import RANDOM_WEIGHTS_KEY
from service.models.hf_checkpoints import ALPHABET

# shape -> (layers, hidden, heads)
HF_SHAPES = {"tiny": (2, 64, 4), "8m": (6, 320, 20), "35m": (12, 480, 20)}


def esm2_config(layers: int, dim: int, heads: int, **overrides) -> EsmConfig:
    """The config facebook/esm2_* repos ship, at any shape."""
    return EsmConfig(**{
        "vocab_size": len(ALPHABET.all_toks), "mask_token_id": ALPHABET.mask_idx, "pad_token_id": ALPHABET.padding_idx,
        "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": 4 * dim,
        "position_embedding_type": "rotary", "token_dropout": True, "emb_layer_norm_before": False,
        "layer_norm_eps": 1e-5, "max_position_embeddings": 1026, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, **overrides,
    })


def save(model, out_dir: Path, random_weights: bool = True) -> Path:
    """save_pretrained plus the tokenizer's vocab.txt, as hub repos hold them."""
    if random_weights:
        setattr(model.config, RANDOM_WEIGHTS_KEY, True)
    model.save_pretrained(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = out_dir / "vocab.txt"
    vocab.write_text("\n".join(ALPHABET.all_toks) + "\n")
    EsmTokenizer(str(vocab)).save_pretrained(out_dir)
    return out_dir


def write_random_hf(shape: str, out_dir: Path, seed: int = 0, model_class=EsmForMaskedLM, **overrides) -> Path:
    torch.manual_seed(seed)
    model = model_class(esm2_config(*HF_SHAPES[shape], **overrides)).eval()
    with torch.no_grad():  # like the fair-esm maker: every LayerNorm and bias away from its init
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                param.add_(0.02 * torch.randn_like(param))
    return save(model, out_dir)


def convert_fair_esm(loaded, out_dir: Path) -> Path:
    """Write a fair-esm model's weights as an HF EsmForMaskedLM (an independent mapping)."""
    fair = loaded.model.state_dict()
    model = EsmForMaskedLM(esm2_config(loaded.num_layers, loaded.embed_dim, loaded.attention_heads)).eval()
    per_layer = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
                 "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
                 "self_attn_layer_norm": "attention.LayerNorm", "fc1": "intermediate.dense",
                 "fc2": "output.dense", "final_layer_norm": "LayerNorm"}
    ours = {
        "esm.embeddings.word_embeddings.weight": fair["embed_tokens.weight"],
        "esm.encoder.emb_layer_norm_after.weight": fair["emb_layer_norm_after.weight"],
        "esm.encoder.emb_layer_norm_after.bias": fair["emb_layer_norm_after.bias"],
        "esm.contact_head.regression.weight": fair["contact_head.regression.weight"],
        "esm.contact_head.regression.bias": fair["contact_head.regression.bias"],
        "lm_head.bias": fair["lm_head.bias"],
        **{f"lm_head.{part}.{p}": fair[f"lm_head.{part}.{p}"]
           for part in ("dense", "layer_norm") for p in ("weight", "bias")},
    }
    for i in range(loaded.num_layers):
        for src, dst in per_layer.items():
            for p in ("weight", "bias"):
                ours[f"esm.encoder.layer.{i}.{dst}.{p}"] = fair[f"layers.{i}.{src}.{p}"]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.decoder.weight", "esm.rotary_embeddings.inv_freq"}, missing
    model.tie_weights()
    return save(model, out_dir, random_weights=loaded.random_weights)


def load_reference(directory: Path):
    """transformers' own model from the directory, with eager attention (maps are returned)."""
    model = EsmForMaskedLM.from_pretrained(directory, attn_implementation="eager").eval()
    return model


def hf_reference(model, sequence: str) -> dict:
    """Every output of one sequence alone from transformers' EsmForMaskedLM, residues only."""
    ids = [ALPHABET.cls_idx, *(ALPHABET.get_idx(c) for c in sequence), ALPHABET.eos_idx]
    tokens = torch.tensor([ids])
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        out = model(tokens, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        contacts = model.predict_contacts(tokens, mask)[0].numpy()
    L = len(sequence)
    n = model.config.num_hidden_layers
    hidden = [h[0].numpy() for h in out.hidden_states]  # embeddings, then each layer's output
    # fair-esm's last representation is after the final LayerNorm; transformers' last hidden state too.
    with torch.no_grad():
        last = model.esm(tokens, attention_mask=mask).last_hidden_state[0].numpy()
    reps = {k: hidden[k] for k in range(n)} | {n: last}
    columns = [ALPHABET.get_idx(a) for a in STANDARD_ORDER]
    attentions = torch.stack(out.attentions, 1)[0]  # [layers, heads, T, T]
    return {
        "mean": {k: v[1 : L + 1].mean(0) for k, v in reps.items()},
        "per_token": {k: v[1 : L + 1] for k, v in reps.items()},
        "bos": {k: v[0] for k, v in reps.items()},
        "logits": out.logits[0, 1 : L + 1][:, columns].numpy(),
        "contacts": contacts,
        "attentions": attentions[:, :, 1 : L + 1, 1 : L + 1].mean((0, 1)).numpy(),
        "length": L,
    }


def make_hf_cache(hf_home: Path, repo_id: str, snapshot: Path, commit: str = "0" * 40) -> Path:
    """Lay out `snapshot` as huggingface_hub's cache holds a downloaded repo (no network)."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    target = repo_dir / "snapshots" / commit
    target.mkdir(parents=True, exist_ok=True)
    for f in snapshot.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return target


def name_or_path(directory: Path) -> str:
    return json.loads((directory / "config.json").read_text()).get("_name_or_path", "")


