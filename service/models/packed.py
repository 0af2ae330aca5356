"""One ESM-2 forward pass over packed sequences: no padding at all.

The batch is the concatenation of its sequences' tokens, [N] (each BOS + residues + EOS), with
their cumulative lengths `cu_seqlens` [B + 1] (sequence i is tokens cu[i]:cu[i + 1]). Every
per-token step (embedding, layer norms, the Linear layers, GELU, the LM head) runs on the packed
[N, E] activations, so no work goes to padding; only attention is per sequence:
- on CUDA in fp16/bf16, flash attention over the packed tokens (`torch.nn.attention.varlen`);
- elsewhere (CPU, and CUDA in fp32, which flash attention does not take), fused SDPA on each
  sequence's own segment of the packed tensors: the same code, tested on CPU.

Same arithmetic as `service.models.forward`'s fast path (and fair-esm's layer), equal to the
padded path within fp32 rounding. It serves representations and logits; attention maps
(contacts, attentions) keep the exact padded path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from service.models.forward import (BatchOutput, BatchPlan, LayerHook, _linear_gelu, _plus_linear, _rotary_tables, _rotate,
                                    amino_acid_columns)


@dataclass
class PackedOutput:
    """Packed tensors: row j is token j of the concatenation (BOS and EOS included)."""

    representations: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, E]
    logits: torch.Tensor | None = None  # [N, 20]


def pack(token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences' token ids ([L_i] each) -> (tokens [N], cu_seqlens [B + 1], int32)."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(token_ids) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    return torch.cat(token_ids), cu_seqlens


def _varlen_attention():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch: per-sequence SDPA everywhere
        return None
    return varlen_attn


def _attention(q, k, v, cu: list[int], cu_seqlens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """Attention of each sequence over its own tokens; q, k, v [N, H, hd] -> [N, H, hd]."""
    varlen = _varlen_attention() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if varlen is not None:
        return varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale)
    out = torch.empty_like(q)
    for start, end in zip(cu[:-1], cu[1:]):
        # [L, H, hd] -> [1, H, L, hd] views; SDPA writes [1, H, L, hd], copied back into rows start:end
        segment = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*segment, scale=scale)[0].transpose(0, 1)
    return out


def _packed_layer(layer, x: torch.Tensor, rotary, cu: list[int], cu_seqlens, max_len: int) -> torch.Tensor:
    """One TransformerLayer on packed x [N, E]."""
    mha = layer.self_attn
    N, E = x.shape
    H, hd = mha.num_heads, mha.head_dim
    h = layer.self_attn_layer_norm(x)
    q = _rotate(mha.q_proj(h).view(N, H, hd), *rotary)
    k = _rotate(mha.k_proj(h).view(N, H, hd), *rotary)
    v = mha.v_proj(h).view(N, H, hd)
    out = _attention(q, k, v, cu, cu_seqlens, max_len, mha.scaling)
    x = _plus_linear(x, mha.out_proj, out.reshape(N, E))
    return _plus_linear(x, layer.fc2, _linear_gelu(layer.fc1, layer.final_layer_norm(x)))


def unpack(out: PackedOutput, cu_seqlens: torch.Tensor) -> BatchOutput:
    """The packed outputs as batch rows [B, T, ...] (T: the longest sequence; the rest zero), on
    their device, so that the worker copies and slices both paths' outputs the same way. Only the
    outputs asked for are packed, and a row's padding is never read."""
    cu = cu_seqlens.tolist()

    def rows(packed: torch.Tensor) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence([packed[a:b] for a, b in zip(cu[:-1], cu[1:])], batch_first=True)

    return BatchOutput(representations={layer: rows(rep) for layer, rep in out.representations.items()},
                       logits=None if out.logits is None else rows(out.logits))


@torch.inference_mode()
def packed_forward(model, tokens: torch.Tensor, cu_seqlens: torch.Tensor, plan: BatchPlan,
                   hook: LayerHook | None = None) -> PackedOutput:
    """Run ESM-2 on packed `tokens` [N] with `cu_seqlens` [B + 1]; see the module docstring.
    `plan` must not need attention maps (service.models.forward serves those); `hook`, if given,
    is called between every two layers."""
    if plan.needs_maps:
        raise ValueError("the packed path makes no attention maps; use service.models.forward")
    cu = cu_seqlens.tolist()  # host offsets: nothing below asks the device for a size (a host sync on CUDA)
    host_lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    lengths = torch.tensor(host_lengths, device=tokens.device)
    sequence_of = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths,
                                          output_size=len(tokens))  # [N]
    x = model.embed_scale * model.embed_tokens(tokens)  # [N, E]
    if model.token_dropout:
        masked = tokens == model.mask_idx
        x.masked_fill_(masked.unsqueeze(-1), 0.0)
        mask_ratio_train = 0.15 * 0.8
        mask_ratio_observed = torch.zeros(len(lengths), device=x.device, dtype=x.dtype)
        mask_ratio_observed.index_add_(0, sequence_of, masked.to(x.dtype))
        mask_ratio_observed = mask_ratio_observed / lengths.to(x.dtype)
        x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[sequence_of, None]

    out = PackedOutput()
    if 0 in plan.layers:
        out.representations[0] = x
    max_len = max(host_lengths)
    positions = torch.arange(len(tokens), device=tokens.device) - cu_seqlens.to(tokens.device).long()[sequence_of]
    cos, sin = _rotary_tables(model.layers[0].self_attn.rot_emb, max_len, x.device)
    rotary = cos[positions][:, None, :], sin[positions][:, None, :]  # [N, 1, hd], broadcast over heads
    cu_seqlens = cu_seqlens.to(tokens.device)
    depth = plan.depth(model.num_layers)
    for index, layer in enumerate(model.layers[:depth]):
        if hook is not None and index:
            hook.between_layers()
        x = _packed_layer(layer, x, rotary, cu, cu_seqlens, max_len)
        if index + 1 in plan.layers and index + 1 != model.num_layers:
            out.representations[index + 1] = x
    if depth < model.num_layers:
        return out
    x = model.emb_layer_norm_after(x)
    if model.num_layers in plan.layers:
        out.representations[model.num_layers] = x
    if plan.logits:
        out.logits = model.lm_head(x)[..., amino_acid_columns(model.alphabet)]
    return out
