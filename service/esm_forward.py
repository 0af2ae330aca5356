"""One ESM-2 forward pass over a padded batch, computing only what was asked for.

Mirrors fair-esm's `ESM2.forward` (esm/model/esm2.py) over the model's own modules,
with two changes that leave the numbers equal to stock within float rounding:
- batches that need no attention maps may use PyTorch's fused
  `scaled_dot_product_attention` instead of fair-esm's explicit softmax(QK^T)V;
- attention maps are reduced layer by layer (into the head/layer mean and into the
  contact head's logistic-regression sum) instead of stacking every layer's maps,
  so peak memory grows with one layer's maps, not all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from esm.modules import apc, symmetrize

# The 20 standard amino acids; logits are reported over these, in model alphabet order.
STANDARD_AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWY")


@dataclass(frozen=True)
class BatchPlan:
    """What one forward pass must produce (the union over the batch's items)."""

    layers: frozenset[int] = frozenset()
    logits: bool = False
    attentions: bool = False
    contacts: bool = False
    fast_attention: bool = True

    @property
    def needs_maps(self) -> bool:
        return self.attentions or self.contacts


@dataclass
class BatchOutput:
    """Batch-shaped tensors; token axis includes BOS/EOS/padding."""

    representations: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T, D]
    logits: torch.Tensor | None = None  # [B, T, 20]
    attentions: torch.Tensor | None = None  # [B, T, T], mean over layers and heads
    contacts: torch.Tensor | None = None  # [B, T-2, T-2], BOS/EOS removed


def amino_acid_columns(alphabet) -> list[int]:
    return [i for i, tok in enumerate(alphabet.all_toks) if tok in STANDARD_AMINO_ACIDS]


def _fused_self_attention(mha, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """fair-esm's MultiheadAttention (rotary, no bias_kv) through fused SDPA."""
    T, B, E = x.shape
    H, hd = mha.num_heads, mha.head_dim

    def heads(t):  # [T, B, E] -> [B*H, T, hd], fair-esm's layout
        return t.contiguous().view(T, B * H, hd).transpose(0, 1)

    q, k = mha.rot_emb(heads(mha.q_proj(x) * mha.scaling), heads(mha.k_proj(x)))
    v = heads(mha.v_proj(x))
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.view(B, H, T, hd), k.view(B, H, T, hd), v.view(B, H, T, hd), attn_mask=mask, scale=1.0
    )
    return mha.out_proj(out.permute(2, 0, 1, 3).reshape(T, B, E))


def _layer(layer, x, key_padding_mask, need_maps: bool, fast: bool):
    """One TransformerLayer; returns (x, per-head maps [H, B, T, T] or None)."""
    if need_maps or not fast:
        x, maps = layer(x, self_attn_padding_mask=key_padding_mask, need_head_weights=need_maps)
        return x, maps if need_maps else None
    x = x + _fused_self_attention(layer.self_attn, layer.self_attn_layer_norm(x), key_padding_mask)
    residual = x
    x = layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))  # fair-esm's gelu is erf-exact
    return residual + x, None


@torch.inference_mode()
def forward(model, tokens: torch.Tensor, plan: BatchPlan) -> BatchOutput:
    """Run ESM-2 on `tokens` [B, T] (BOS + residues + EOS + padding)."""
    padding_mask = tokens.eq(model.padding_idx)
    x = model.embed_scale * model.embed_tokens(tokens)
    if model.token_dropout:
        x.masked_fill_((tokens == model.mask_idx).unsqueeze(-1), 0.0)
        mask_ratio_train = 0.15 * 0.8
        src_lengths = (~padding_mask).sum(-1)
        mask_ratio_observed = (tokens == model.mask_idx).sum(-1).to(x.dtype) / src_lengths
        x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
    x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))

    out = BatchOutput()
    if 0 in plan.layers:
        out.representations[0] = x
    key_padding_mask = padding_mask if padding_mask.any() else None

    if plan.needs_maps:
        real = (~padding_mask).to(x.dtype)
        pair_mask = (real[:, :, None] * real[:, None, :])[:, None]  # [B, 1, T, T]
        not_eos = tokens.ne(model.eos_idx).to(x.dtype)
        eos_pair_mask = (not_eos[:, :, None] * not_eos[:, None, :])[:, None]
        regression = model.contact_head.regression
        H = model.attention_heads
        attention_sum = contact_logits = None

    x = x.transpose(0, 1)  # [T, B, E]
    for index, layer in enumerate(model.layers):
        x, maps = _layer(layer, x, key_padding_mask, plan.needs_maps, plan.fast_attention)
        if index + 1 in plan.layers and index + 1 != model.num_layers:
            out.representations[index + 1] = x.transpose(0, 1)
        if maps is None:
            continue
        maps = maps.transpose(0, 1).float() * pair_mask  # [B, H, T, T], padding zeroed as stock
        if plan.attentions:
            layer_sum = maps.sum(1)
            attention_sum = layer_sum if attention_sum is None else attention_sum + layer_sum
        if plan.contacts:
            # fair-esm's ContactPredictionHead, one layer's channels at a time.
            features = apc(symmetrize((maps * eos_pair_mask)[..., 1:-1, 1:-1]))
            weights = regression.weight[0, index * H : (index + 1) * H].to(features.dtype)
            layer_logits = torch.einsum("bhij,h->bij", features, weights)
            contact_logits = layer_logits if contact_logits is None else contact_logits + layer_logits
        del maps

    x = model.emb_layer_norm_after(x).transpose(0, 1)  # [B, T, E]
    if model.num_layers in plan.layers:
        out.representations[model.num_layers] = x
    if plan.logits:
        out.logits = model.lm_head(x)[..., amino_acid_columns(model.alphabet)]
    if plan.attentions:
        out.attentions = attention_sum / (model.num_layers * H)
    if plan.contacts:
        out.contacts = torch.sigmoid(contact_logits + regression.bias.to(contact_logits.dtype))
    return out
