"""Serve Hugging Face ESM-2 checkpoints through fair-esm's ESM2 module.

A Hugging Face checkpoint is a `save_pretrained` directory: `config.json` plus weights in
safetensors (read with the safetensors library) or `pytorch_model.bin` (read with torch's
`weights_only=True` unpickler, never a full unpickle). `transformers` is not needed: the
weights are renamed into fair-esm's module layout at load time, so HF models run through
the same forward pass, batching and fast path as fair-esm ones.

Only what that forward pass computes exactly is accepted. The config is checked field by
field (architecture, vocabulary, rotary positions, pre-LN, 4x feed-forward, head size) and
every tensor's name and shape is checked against the module before loading; anything else
is refused at start-up with the reason. A checkpoint without an LM head (EsmModel, a
classification fine-tune) serves embeddings and refuses logits per request; one without
contact-head weights refuses contacts per request.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import esm
import torch

from service.models.checkpoints import RANDOM_WEIGHTS_KEY, BadCheckpoint, check_shape, one_line, unpickler_refusal

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
VOCAB_FILE = "vocab.txt"
# What a hub download fetches: first the config, vocabulary and model card (enough to check
# the model and its memory need), then the weights in one of the two formats.
CONFIG_PATTERNS = [CONFIG_FILE, VOCAB_FILE, "README.md"]
WEIGHT_PATTERNS = ["model*.safetensors", SAFETENSORS_INDEX]
BIN_WEIGHT_PATTERNS = ["pytorch_model*.bin", BIN_INDEX]

# Architectures whose `esm.*` weights are an ESM-2 encoder; their other heads are ignored.
KNOWN_ARCHITECTURES = {"EsmForMaskedLM", "EsmModel", "EsmForSequenceClassification", "EsmForTokenClassification"}
ALPHABET = esm.data.Alphabet.from_architecture("ESM-1b")  # fair-esm's ESM-2 vocabulary


class UnservableModel(BadCheckpoint):
    """A checkpoint the forward pass cannot serve exactly; the message says why."""


@dataclass(frozen=True)
class HfShape:
    """What config.json says, once checked servable."""

    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool
    layer_norm_eps: float
    rope_theta: float
    name_or_path: str  # the model it was fine-tuned from / saved as ("" when unknown)
    architecture: str
    random_weights: bool  # marked by service.models.random_checkpoints


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_config(directory: Path) -> HfShape:
    """Parse and check config.json; raise UnservableModel listing every problem."""
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnservableModel(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise UnservableModel(f"{path}: is a JSON {type(config).__name__}; expected an object of settings")
    problems = []

    def expect(key, wanted, default=None, why=""):
        value = config.get(key, default)
        if value != wanted:
            problems.append(f"{key} is {value!r}, expected {wanted!r}{why}")

    expect("model_type", "esm", why=" (only ESM-2 is served)")
    architectures = config.get("architectures") or ["EsmForMaskedLM"]
    architecture = architectures[0]
    if architecture not in KNOWN_ARCHITECTURES:
        problems.append(f"architecture {architecture!r} is not one of {sorted(KNOWN_ARCHITECTURES)}")
    expect("position_embedding_type", "rotary", "absolute",
           " (ESM-2 uses rotary positions; ESM-1b's learned ones are not served)")
    expect("is_folding_model", False, False, " (ESMFold is not served)")
    expect("emb_layer_norm_before", False, False, " (ESM-2 has no embedding LayerNorm)")
    expect("is_decoder", False, False)
    expect("add_cross_attention", False, False)
    expect("vocab_size", len(ALPHABET.all_toks), why=" (ESM-2's vocabulary)")
    expect("pad_token_id", ALPHABET.padding_idx)
    expect("mask_token_id", ALPHABET.mask_idx)
    layers = config.get("num_hidden_layers", 12)
    dim = config.get("hidden_size", 768)
    heads = config.get("num_attention_heads", 12)
    check_shape(path, ("num_hidden_layers", layers), ("hidden_size", dim), ("num_attention_heads", heads))
    expect("intermediate_size", 4 * dim, why=" (fair-esm's feed-forward is 4 x hidden_size)")
    head_dim = config.get("head_dim")
    if head_dim not in (None, dim // heads):
        problems.append(f"head_dim is {head_dim!r}, expected hidden_size / num_attention_heads = {dim // heads}")
    for key, default in (("layer_norm_eps", 1e-12), ("rope_theta", 10000.0)):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            problems.append(f"{key} is {value!r}, expected a positive number")
    for key in ("token_dropout", RANDOM_WEIGHTS_KEY):
        if not isinstance(config.get(key, False), bool):
            problems.append(f"{key} is {config[key]!r}, expected true or false")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in (None, "default"):
        problems.append(f"rope type {rope_type!r} is not served (only plain rotary positions)")
    if problems:
        raise UnservableModel(f"{path}: {directory} cannot be served exactly: " + "; ".join(problems))
    return HfShape(
        num_layers=layers,
        embed_dim=dim,
        attention_heads=heads,
        token_dropout=bool(config.get("token_dropout", False)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        name_or_path=str(config.get("_name_or_path", "") or "") or _base_model(directory),
        architecture=architecture,
        random_weights=bool(config.get(RANDOM_WEIGHTS_KEY, False)),
    )


def _base_model(directory: Path) -> str:
    """The model card's `base_model` (transformers 5 no longer saves `_name_or_path`)."""
    card = directory / "README.md"
    if not card.is_file():
        return ""
    from huggingface_hub.repocard import metadata_load

    try:
        base = (metadata_load(card) or {}).get("base_model", "")
    except Exception as exc:  # a malformed card only loses the origin
        log.warning("%s: unreadable model card metadata (%s)", card, exc)
        return ""
    return ", ".join(base) if isinstance(base, list) else str(base or "")


def check_vocabulary(directory: Path) -> None:
    """vocab.txt, when present, must list fair-esm's tokens in fair-esm's order."""
    path = directory / VOCAB_FILE
    if not path.is_file():
        log.info("%s has no %s: assuming ESM-2's vocabulary (config ids match it)", directory, VOCAB_FILE)
        return
    tokens = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if tokens != ALPHABET.all_toks:
        raise UnservableModel(
            f"{path}: the vocabulary differs from ESM-2's ({len(tokens)} tokens, expected "
            f"{len(ALPHABET.all_toks)} in fair-esm's order starting {ALPHABET.all_toks[:5]})"
        )


def has_weights(directory: Path) -> bool:
    return any((directory / f).is_file() for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX, BIN_FILE, BIN_INDEX))


def shard_names(index: Path) -> list[str]:
    """The shard files an index's weight_map names, each checked to be a plain relative path
    inside the checkpoint directory (never absolute, never through `..`)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise UnservableModel(f"{index}: not a readable JSON index ({one_line(exc)})") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnservableModel(f"{index}: weight_map: missing or empty; expected tensor names mapped to shard files")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise UnservableModel(f"{index}: weight_map[{tensor!r}]: {shard!r} is not a file name")
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise UnservableModel(f"{index}: weight_map[{tensor!r}]: shard {shard!r} is outside the checkpoint "
                                  "directory; shards must be paths inside it")
    return sorted(set(weight_map.values()))


def weight_files(directory: Path) -> list[Path]:
    """The weight files, safetensors first; raise UnservableModel naming what was looked for."""
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (BIN_INDEX, BIN_FILE)):
        if (directory / index).is_file():
            shards = shard_names(directory / index)
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise UnservableModel(f"{directory}: shards listed in {index} are missing: {', '.join(missing)}")
            return [directory / s for s in shards]
        if (directory / single).is_file():
            return [directory / single]
    raise UnservableModel(
        f"{directory} has no weights: looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE}, {BIN_INDEX}"
    )


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    import safetensors.torch

    state = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                state.update(safetensors.torch.load_file(str(path), device="cpu"))
            except Exception as exc:  # SafetensorError, or OSError for an unreadable file
                raise UnservableModel(f"{path}: not a readable safetensors file ({one_line(exc)})") from exc
        else:
            try:  # the restricted unpickler: tensors and plain containers only
                loaded = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise UnservableModel(f"could not load {path} with weights_only=True: "
                                      f"{unpickler_refusal(exc)}") from exc
            if not isinstance(loaded, dict):
                raise UnservableModel(f"{path}: holds a {type(loaded).__name__}; expected tensor names mapped to tensors")
            state.update(loaded)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UnservableModel(f"{', '.join(map(str, files))}: {key}: is {type(value).__name__}; expected a tensor")
    return state


# HF name -> fair-esm ESM2 name, per encoder layer (after LayerNorm gamma/beta -> weight/bias).
_LAYER_NAMES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",  # pre-LN before attention
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",  # pre-LN before the feed-forward
}
_TOP_NAMES = {
    "esm.embeddings.word_embeddings.weight": "embed_tokens.weight",
    "esm.encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
    "esm.encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias",
    "esm.contact_head.regression.weight": "contact_head.regression.weight",
    "esm.contact_head.regression.bias": "contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
    "lm_head.decoder.weight": "lm_head.weight",  # absent when tied to the embeddings
}
_LAYER_KEY = re.compile(r"^esm\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
# Rotary inverse frequencies: one model-level buffer (transformers 5), or per layer (older
# saves, and transformers 5's own save writes the per-layer name with a `*`).
_INV_FREQ_KEY = re.compile(r"^esm\.(rotary_embeddings|encoder\.layer\.[^.]+\.attention\.self\.rotary_embeddings)\.inv_freq$")
# Ignored with a log line: heads the service has no output for.
_IGNORED_PREFIXES = ("classifier.", "esm.pooler.", "esm.embeddings.position_ids")


@dataclass
class Converted:
    state: dict[str, torch.Tensor]  # fair-esm names
    inv_freq: torch.Tensor | None
    ignored: list[str]
    unknown: list[str]


def convert_names(hf_state: dict[str, torch.Tensor]) -> Converted:
    """Rename HF tensors to fair-esm's ESM2 names. Accepts a bare EsmModel's names (no `esm.`)."""
    if not any(k.startswith("esm.") for k in hf_state):
        hf_state = {(k if k.startswith(("lm_head.", "classifier.")) else f"esm.{k}"): v for k, v in hf_state.items()}
    state, ignored, unknown, inv_freq = {}, [], [], None
    for key, tensor in hf_state.items():
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        if _INV_FREQ_KEY.match(name):
            inv_freq = tensor if inv_freq is None else inv_freq
            continue
        if name in _TOP_NAMES:
            state[_TOP_NAMES[name]] = tensor
            continue
        match = _LAYER_KEY.match(name)
        if match and match.group(2) in _LAYER_NAMES:
            state[f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"] = tensor
        elif name.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
        else:
            unknown.append(key)
    return Converted(state, inv_freq, ignored, unknown)


@dataclass
class HfModel:
    """A checkpoint read into fair-esm's ESM2, and which of the optional heads it brought."""

    model: torch.nn.Module  # esm.model.esm2.ESM2, eval mode, on CPU
    shape: HfShape
    has_lm_head: bool  # False: logits and predictions are refused per request
    has_contact_head: bool  # False: contacts are refused per request


def build_model(shape: HfShape, converted: Converted, source: str) -> HfModel:
    """fair-esm's ESM2 holding the checkpoint's weights."""
    if converted.unknown:
        raise UnservableModel(
            f"{source} holds tensors an ESM-2 encoder does not have: {', '.join(sorted(converted.unknown)[:8])}"
            + (" ..." if len(converted.unknown) > 8 else "")
        )
    if converted.ignored:
        heads = sorted({".".join(k.split(".")[: 2 if k.startswith("esm.") else 1]) for k in converted.ignored})
        log.info("%s: ignoring %d tensors of heads the service does not serve (%s)",
                 source, len(converted.ignored), ", ".join(heads))
    model = esm.model.esm2.ESM2(
        num_layers=shape.num_layers, embed_dim=shape.embed_dim, attention_heads=shape.attention_heads,
        alphabet=ALPHABET, token_dropout=shape.token_dropout,
    )
    expected = model.state_dict()
    state = dict(converted.state)
    lm_head_keys = {k for k in expected if k.startswith("lm_head.")}
    has_lm_head = any(k.startswith("lm_head.") for k in state)
    has_contact_head = "contact_head.regression.weight" in state
    tied = has_lm_head and "lm_head.weight" not in state
    # The module ties lm_head.weight to the embeddings; a checkpoint with its own decoder
    # matrix gets it untied, so both are served as saved.
    untied_decoder = state.pop("lm_head.weight", None) if has_lm_head else None
    required = set(expected) - {"lm_head.weight"} - {k for k in expected if k.endswith("rot_emb.inv_freq")}
    if not has_lm_head:
        required -= lm_head_keys
    if not has_contact_head:
        required -= {"contact_head.regression.weight", "contact_head.regression.bias"}
    missing = sorted(required - set(state))
    if missing:
        raise UnservableModel(f"{source} lacks tensors an ESM-2 encoder needs: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    extra = sorted(set(state) - set(expected))
    if extra:  # e.g. more encoder layers than config.json says
        raise UnservableModel(f"{source} holds tensors its config does not describe: {', '.join(extra[:8])}")
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if untied_decoder is not None and tuple(untied_decoder.shape) != tuple(expected["lm_head.weight"].shape):
        wanted = tuple(expected["lm_head.weight"].shape)
        wrong.append(f"lm_head.decoder.weight {tuple(untied_decoder.shape)} (expected {wanted})")
    if wrong:
        raise UnservableModel(f"{source}: tensors of the wrong shape for its config: {', '.join(wrong[:8])}")
    model.load_state_dict(state, strict=False)  # every required key was checked above
    with torch.no_grad():
        if untied_decoder is not None and not torch.equal(untied_decoder, state["embed_tokens.weight"]):
            model.lm_head.weight = torch.nn.Parameter(untied_decoder.float().clone())
        inv_freq = converted.inv_freq
        if inv_freq is None:  # not saved: recompute as transformers does, from rope_theta
            head_dim = shape.embed_dim // shape.attention_heads
            inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        for layer in model.layers:
            if tuple(inv_freq.shape) != tuple(layer.self_attn.rot_emb.inv_freq.shape):
                raise UnservableModel(f"{source}: rotary inv_freq has shape {tuple(inv_freq.shape)}, "
                                      f"expected {tuple(layer.self_attn.rot_emb.inv_freq.shape)}")
            layer.self_attn.rot_emb.inv_freq.copy_(inv_freq)  # kept float32, as transformers computes
        for module in model.modules():  # transformers honours config.layer_norm_eps; fair-esm fixes 1e-5
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = shape.layer_norm_eps
    if not has_lm_head:
        log.warning("%s has no masked-LM head (%s): logits will be refused", source, shape.architecture)
    elif tied:
        log.info("%s: LM decoder tied to the token embeddings", source)
    if not has_contact_head:
        log.warning("%s has no contact-head weights: contacts will be refused", source)
    model.eval().requires_grad_(False)
    return HfModel(model, shape, has_lm_head, has_contact_head)


def load_directory(directory: Path, source: str) -> HfModel:
    """Read, check and convert a save_pretrained directory."""
    shape = read_config(directory)
    check_vocabulary(directory)
    files = weight_files(directory)
    log.info("reading %s (%s)", source, ", ".join(str(f) for f in files))
    return build_model(shape, convert_names(read_weights(files)), source)
