"""One ESM-2 forward pass over a padded batch, computing only what was asked for.

Mirrors fair-esm's `ESM2.forward` (esm/model/esm2.py) over the model's own modules,
with three changes that leave the numbers equal to stock within float rounding:
- batches that need no attention maps may use PyTorch's fused
  `scaled_dot_product_attention` instead of fair-esm's explicit softmax(QK^T)V;
- attention maps are reduced layer by layer (into the head/layer mean and into the
  contact head's logistic-regression sum) instead of stacking every layer's maps,
  so peak memory grows with one layer's maps, not all of them;
- a batch that asks only for representations up to layer k runs k layers, not all of them
  (every layer's output is what the full pass computes there; fair-esm's final layer norm
  is applied only to the last layer's representation, so it runs only when that is asked).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from esm.modules import apc, symmetrize

from esm2_wire import output_kinds
from esm2_wire.output_kinds import OutputKind

# Logits are reported over the standard amino acids, in alphabet order.
from esm2_wire.vocabulary import STANDARD_AMINO_ACIDS


@dataclass(frozen=True)
class BatchPlan:
    """What one forward pass must produce (the union over the batch's items)."""

    layers: frozenset[int] = frozenset()  # representations to keep
    outputs: frozenset[OutputKind] = frozenset()  # logits, attentions and contacts are computed when here
    fast_attention: bool = True

    @property
    def needs_maps(self) -> bool:
        return output_kinds.needs_maps(self.outputs)

    def depth(self, num_layers: int) -> int:
        """Transformer layers to run: the deepest representation kept, or all for logits and maps."""
        return output_kinds.layers_to_run(self.outputs, self.layers, num_layers)

    @property
    def logits(self) -> bool:
        return OutputKind.LOGITS in self.outputs

    @property
    def attentions(self) -> bool:
        return OutputKind.ATTENTIONS in self.outputs

    @property
    def contacts(self) -> bool:
        return OutputKind.CONTACTS in self.outputs


class LayerHook(Protocol):
    """Called by the forward pass between every two layers, on the thread that runs it. Whoever
    owns the device may use it there (e.g. for short work that should not wait for this pass to
    end), so long as the model is left as it was."""

    def between_layers(self) -> None: ...


@dataclass
class BatchOutput:
    """Batch-shaped tensors; token axis includes BOS/EOS/padding."""

    representations: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, T, D]
    logits: torch.Tensor | None = None  # [B, T, 20]
    attentions: torch.Tensor | None = None  # [B, T, T], mean over layers and heads
    contacts: torch.Tensor | None = None  # [B, T-2, T-2], BOS/EOS removed


def amino_acid_columns(alphabet) -> list[int]:
    return [i for i, tok in enumerate(alphabet.all_toks) if tok in STANDARD_AMINO_ACIDS]


def _rotary_tables(rot_emb, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fair-esm's rotary cos/sin tables [T, head_dim], computed once per batch for all layers
    (without touching the module's shared cache), in the compute dtype under autocast. `sin` carries rotate_half's sign, so that
    rotate_half(x) * sin == roll(x, head_dim / 2) * signed_sin exactly."""
    t = torch.arange(length, device=device).type_as(rot_emb.inv_freq)
    freqs = torch.outer(t, rot_emb.inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    sign = torch.ones_like(angles)
    sign[:, : freqs.shape[-1]] = -1
    cos, signed_sin = angles.cos(), angles.sin() * sign
    if torch.is_autocast_enabled(device.type):  # q and k come out of the Linear layers in this dtype:
        dtype = torch.get_autocast_dtype(device.type)  # cast once here, not 4 times per layer in _rotate
        cos, signed_sin = cos.to(dtype), signed_sin.to(dtype)
    return cos, signed_sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # fair-esm's x * cos + rotate_half(x) * sin, in 3 kernels instead of 6.
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos.to(x.dtype), rolled, signed_sin.to(x.dtype))  # .to: no-ops, tables already cast


def _fast_layer(layer, x: torch.Tensor, attend: torch.Tensor | None, rotary) -> torch.Tensor:
    """One TransformerLayer on batch-first x [B, T, E], attention through fused SDPA.

    Same arithmetic as fair-esm's layer except the order of rounding: q's scaling moves into
    SDPA, heads are views of the projections (no layout copies)."""
    mha = layer.self_attn
    B, T, E = x.shape
    H, hd = mha.num_heads, mha.head_dim
    h = layer.self_attn_layer_norm(x)

    def heads(t):  # [B, T, E] -> [B, H, T, hd], a view
        return t.view(B, T, H, hd).transpose(1, 2)

    q = _rotate(heads(mha.q_proj(h)), *rotary)
    k = _rotate(heads(mha.k_proj(h)), *rotary)
    out = F.scaled_dot_product_attention(q, k, heads(mha.v_proj(h)), attn_mask=attend, scale=mha.scaling)
    x = _plus_linear(x, mha.out_proj, out.transpose(1, 2).reshape(B, T, E))
    return _plus_linear(x, layer.fc2, _linear_gelu(layer.fc1, layer.final_layer_norm(x)))


def _linear_gelu(linear, x: torch.Tensor) -> torch.Tensor:
    """gelu(linear(x)), fair-esm's erf-exact GELU; int8 layers (service.models.quantize) do it
    inside their matmul."""
    fused = getattr(linear, "gelu", None)
    return fused(x) if fused is not None else F.gelu(linear(x))


def _plus_linear(residual: torch.Tensor, linear, x: torch.Tensor) -> torch.Tensor:
    """residual + linear(x), as a new tensor; int8 layers add inside their matmul."""
    fused = getattr(linear, "add_to", None)
    return fused(residual, x) if fused is not None else residual + linear(x)


def _full_precision(device: torch.device):
    """Autocast off: what runs inside stays fp32 (the contact head rounds once, as stock)."""
    return torch.autocast(device.type, enabled=False)


def _contact_logits(maps: torch.Tensor, eos_pair_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """fair-esm's ContactPredictionHead on one layer's fp32 maps [B, H, T, T] and that layer's
    H regression weights: [B, T-2, T-2] logits, in fp32 under any autocast (its einsum would
    otherwise run in bf16/fp16, and the sum over layers round at every layer)."""
    with _full_precision(maps.device):
        features = apc(symmetrize((maps * eos_pair_mask)[..., 1:-1, 1:-1]))
        return torch.einsum("bhij,h->bij", features, weights.float())


@torch.inference_mode()
def forward(model, tokens: torch.Tensor, plan: BatchPlan, hook: LayerHook | None = None,
            lengths: list[int] | None = None) -> BatchOutput:
    """Run ESM-2 on `tokens` [B, T] (BOS + residues + EOS + padding); `hook`, if given, is
    called between every two layers. `lengths`, the rows' token counts as the host knows them,
    say whether there is padding without asking the device: on CUDA that question is a host
    sync before any layer is queued (the worker passes them; without them the mask is asked)."""
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
    padded = padding_mask.any() if lengths is None else min(lengths) < tokens.shape[1]
    key_padding_mask = padding_mask if padded else None

    if plan.needs_maps:
        real = (~padding_mask).to(x.dtype)
        pair_mask = (real[:, :, None] * real[:, None, :])[:, None]  # [B, 1, T, T]
        not_eos = tokens.ne(model.eos_idx).to(x.dtype)
        eos_pair_mask = (not_eos[:, :, None] * not_eos[:, None, :])[:, None]
        regression = model.contact_head.regression
        H = model.attention_heads
        attention_sum = contact_logits = None

    fast = plan.fast_attention and not plan.needs_maps
    if fast:  # batch-first throughout
        rotary = _rotary_tables(model.layers[0].self_attn.rot_emb, tokens.shape[1], x.device)
        attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    else:  # fair-esm's own layers, [T, B, E]
        x = x.transpose(0, 1)
    depth = plan.depth(model.num_layers)
    for index, layer in enumerate(model.layers[:depth]):
        if hook is not None and index:
            hook.between_layers()
        if fast:
            x, maps = _fast_layer(layer, x, attend, rotary), None
        else:
            x, maps = layer(x, self_attn_padding_mask=key_padding_mask, need_head_weights=plan.needs_maps)
            maps = maps if plan.needs_maps else None
        if index + 1 in plan.layers and index + 1 != model.num_layers:
            out.representations[index + 1] = x if fast else x.transpose(0, 1)
        if maps is None:
            continue
        maps = maps.transpose(0, 1).float() * pair_mask  # [B, H, T, T], padding zeroed as stock
        if plan.attentions:
            layer_sum = maps.sum(1)
            attention_sum = layer_sum if attention_sum is None else attention_sum + layer_sum
        if plan.contacts:
            layer_logits = _contact_logits(maps, eos_pair_mask, regression.weight[0, index * H : (index + 1) * H])
            contact_logits = layer_logits if contact_logits is None else contact_logits + layer_logits
        del maps

    if depth < model.num_layers:  # stopped early: only inner layers were asked for, and kept above
        return out
    x = model.emb_layer_norm_after(x if fast else x.transpose(0, 1))  # [B, T, E]
    if model.num_layers in plan.layers:
        out.representations[model.num_layers] = x
    if plan.logits:
        out.logits = model.lm_head(x)[..., amino_acid_columns(model.alphabet)]
    if plan.attentions:
        out.attentions = attention_sum / (model.num_layers * H)
    if plan.contacts:
        with _full_precision(contact_logits.device):
            out.contacts = torch.sigmoid(contact_logits + regression.bias)
    return out


@torch.inference_mode()
def time_fast_layer(model, rows: int, width: int, device: torch.device, wait: Callable[[], None]) -> float:
    """Seconds for the first layer's fast path on a [rows, width] batch of random activations
    (the batch budget sweep's probe); `wait` blocks until the device has done the queued work
    (service.platforms: Platform.wait on the stream the probe runs on)."""
    x = torch.randn(rows, width, model.embed_dim, device=device)
    rotary = _rotary_tables(model.layers[0].self_attn.rot_emb, width, device)
    wait()
    start = time.perf_counter()
    _fast_layer(model.layers[0], x, None, rotary)
    wait()
    return time.perf_counter() - start
