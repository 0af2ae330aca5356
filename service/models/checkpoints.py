"""Find and load fair-esm ESM-2 checkpoints, safely; the LoadedModel every format becomes.

A checkpoint is fair-esm's `<stem>.pt` (model weights plus an `argparse.Namespace`
config) and its `<stem>-contact-regression.pt`. Files are unpickled with torch's
`weights_only=True` loader, allowing exactly one extra class: `argparse.Namespace`.
Hugging Face checkpoints are read by service.models.hf_checkpoints into the same module.
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import esm
import numpy as np
import torch

from esm2_wire.vocabulary import MASK

log = logging.getLogger(__name__)

# Served model name -> fair-esm's standard checkpoint stem.
STANDARD_MODELS = {
    "esm2-8m": "esm2_t6_8M_UR50D",
    "esm2-35m": "esm2_t12_35M_UR50D",
    "esm2-150m": "esm2_t30_150M_UR50D",
    "esm2-650m": "esm2_t33_650M_UR50D",
    "esm2-3b": "esm2_t36_3B_UR50D",
    "esm2-15b": "esm2_t48_15B_UR50D",
}
# fair-esm stem -> (layers, embed_dim, attention heads): known before any file is read.
STANDARD_SHAPES = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
FAIR_ESM = "fair-esm"
HUGGING_FACE = "huggingface"
# fair-esm's own download locations (esm/pretrained.py).
_MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{stem}.pt"
_REGRESSION_URL = "https://dl.fbaipublicfiles.com/fair-esm/regression/{stem}-contact-regression.pt"
# Written by service.models.random_checkpoints into every checkpoint it makes.
RANDOM_WEIGHTS_KEY = "esm_service_random_weights"


class CheckpointNotFound(RuntimeError):
    """No checkpoint file in any of the places looked in."""


class BadCheckpoint(RuntimeError):
    """A configuration or weights file the server cannot serve. Its message is one line that
    names the file, the key (when one is to blame) and the problem: start-up stops with it."""

    def __init__(self, message: str):
        super().__init__(one_line(message))

    @classmethod
    def at(cls, path: Path, key: str, problem: str) -> BadCheckpoint:
        return cls(f"{path}: {key}: {problem}")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# torch's refusal repeats advice to turn the restricted unpickler off; the service never will.
_TORCH_ADVICE = ("weights_only", "Weights only load failed", "Check the documentation of torch.load")


def unpickler_refusal(exc: Exception) -> str:
    """What torch's restricted unpickler refused (e.g. "Trying to load unsupported GLOBAL os.system
    ..."), without its advice to load the file unrestricted."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not any(phrase in line for phrase in _TORCH_ADVICE)]
    return one_line(" ".join(kept)) or type(exc).__name__


MASK_TOKEN = MASK
MASK_BYTE = "#"  # stands for `<mask>` while a sequence is read as bytes: never a validated letter


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module  # esm.model.esm2.ESM2, eval mode, on CPU
    alphabet: esm.data.Alphabet
    checkpoint: Path  # where it was read from: for logs only, never shown to callers
    random_weights: bool
    has_contact_regression: bool
    source: str = ""  # what callers see: a file name, directory name or hub repo id
    source_format: str = FAIR_ESM
    finetuned_from: str = ""  # Hugging Face config's _name_or_path
    has_lm_head: bool = True
    # Why contacts are refused, when has_contact_regression is False.
    contacts_unavailable: str = ""
    # "sha256:..." of the state dict as loaded (service.models.fingerprint); set by sources.load.
    weights_fingerprint: str = ""

    def __post_init__(self):
        if not self.source:
            self.source = self.checkpoint.name
        if not self.has_contact_regression and not self.contacts_unavailable:
            self.contacts_unavailable = f"{regression_path(self.checkpoint).name} was not found"

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def attention_heads(self) -> int:
        return self.model.attention_heads

    @property
    def parameters(self) -> int:
        # int8 layers (service.models.quantize) hold theirs packed, outside parameters().
        packed = sum(getattr(module, "quantized_parameters", 0) for module in self.model.modules())
        return sum(p.numel() for p in self.model.parameters()) + packed

    def tokenize(self, tokens: tuple[str, ...]) -> np.ndarray:
        """int64 [BOS, residues..., EOS] for validated tokens (letters and `<mask>`).

        The alphabet's index directly: fair-esm's tokenizer would drop whitespace silently. Read as
        bytes through a 256-entry table, not token by token: a Score request's 950 masked passes of
        1,000 residues took 421 ms token by token, before admission could refuse it (issue 31)."""
        text = "".join(tokens).replace(MASK_TOKEN, MASK_BYTE).encode("ascii")
        ids = np.empty(len(text) + 2, dtype=np.int64)
        ids[0], ids[-1] = self.alphabet.cls_idx, self.alphabet.eos_idx
        ids[1:-1] = self._token_table[np.frombuffer(text, dtype=np.uint8)]
        return ids

    @functools.cached_property
    def _token_table(self) -> np.ndarray:
        """Index of each one-letter token by its byte, `<mask>` at MASK_BYTE; -1 elsewhere (validated
        tokens never reach it)."""
        table = np.full(256, -1, dtype=np.int64)
        for token, index in self.alphabet.tok_to_idx.items():
            if len(token) == 1 and token.isascii():
                table[ord(token)] = index
        table[ord(MASK_BYTE)] = self.alphabet.mask_idx
        return table


def regression_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + "-contact-regression.pt")


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def safe_load(path: Path) -> dict:
    """torch.load with weights_only=True plus the one class fair-esm's format pickles.

    Memory-mapped where the file format allows it, so reading the config costs nothing
    and loading does not hold a second copy of the weights."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be mapped
                if "mmap" not in str(exc):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError
        raise BadCheckpoint(
            f"could not load checkpoint {path}: {unpickler_refusal(exc)}. Only fair-esm ESM-2 checkpoints "
            "(tensors plus an argparse.Namespace config) are accepted."
        ) from exc


def candidate_paths(name: str, explicit: Path | None, model_dir: Path | None) -> list[Path]:
    """Every place a checkpoint for `name` may live, in the order they are tried."""
    if explicit is not None:
        return [explicit]
    stem = STANDARD_MODELS.get(name)
    if stem is None:
        return []
    places = []
    if model_dir is not None:
        places.append(model_dir / f"{stem}.pt")
    places.append(hub_checkpoint_dir() / f"{stem}.pt")
    return places


def download_standard(name: str) -> Path:
    """Fetch a standard checkpoint and its regression file into the torch hub cache,
    from the same URLs fair-esm's `esm.pretrained` uses."""
    stem = STANDARD_MODELS[name]
    target_dir = hub_checkpoint_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{stem}.pt"
    for url, dst in (
        (_MODEL_URL.format(stem=stem), target),
        (_REGRESSION_URL.format(stem=stem), regression_path(target)),
    ):
        if not dst.exists():
            log.info("downloading %s to %s", url, dst)
            torch.hub.download_url_to_file(url, str(dst), progress=False)
    return target


def locate(name: str, explicit: Path | None, model_dir: Path | None, allow_download: bool) -> Path:
    places = candidate_paths(name, explicit, model_dir)
    for path in places:
        if path.is_file():
            return path
    download_error = None
    if allow_download and explicit is None and name in STANDARD_MODELS:
        try:
            return download_standard(name)
        except OSError as exc:  # urllib's URLError included
            download_error = exc
    looked = "\n".join(f"  - {p}" for p in places) or "  (nowhere: no standard file name)"
    if explicit is None and name in STANDARD_MODELS:
        stem = STANDARD_MODELS[name]
        if download_error is not None:
            fetched = f"Download from {_MODEL_URL.format(stem=stem)} failed: {download_error}."
        else:
            fetched = "Downloading is switched off (--offline)."
        how = (
            f"Put {stem}.pt and {stem}-contact-regression.pt in --model-dir or "
            f"{hub_checkpoint_dir()}, or pass --checkpoint {name}=/path/to/{stem}.pt. "
            "Offline, to try the service: `make demo` (random weights at the 8M shape; its outputs are meaningless)."
        )
    else:
        fetched = ""
        how = f"Pass --checkpoint {name}=/path/to/checkpoint.pt (a fair-esm ESM-2 .pt file)."
    raise CheckpointNotFound(
        f"no checkpoint for model {name!r}. Looked in:\n{looked}\n{fetched} {how}".replace("\n ", "\n")
    )


def positive_int(value) -> str | None:
    """Why `value` is not a count (layers, heads, a width), or None. bool is an int to Python, not here."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"is {value!r} ({type(value).__name__}); expected a positive integer"
    if value <= 0:
        return f"is {value}; expected a positive integer"
    return None


def check_shape(path: Path, layers: tuple[str, object], dim: tuple[str, object], heads: tuple[str, object]) -> None:
    """Refuse a config whose (key, value) counts ESM-2's module cannot be built from: each a
    positive integer, the width a multiple of the heads, and an even head size (rotary positions
    turn pairs of dimensions)."""
    for key, value in (layers, dim, heads):
        problem = positive_int(value)
        if problem:
            raise BadCheckpoint.at(path, key, problem)
    (dim_key, width), (heads_key, count) = dim, heads
    if width % count:
        raise BadCheckpoint.at(path, dim_key, f"{width} is not a multiple of {heads_key} {count}")
    if (width // count) % 2:
        raise BadCheckpoint.at(path, dim_key, f"{width} / {heads_key} {count} = {width // count} per head; "
                                              "rotary positions need an even head size")


def _fair_esm_config(path: Path, data) -> argparse.Namespace:
    """The checked model config of a fair-esm file's contents."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or not isinstance(data.get("cfg"), dict):
        raise BadCheckpoint(f"{path} is not a fair-esm ESM-2 checkpoint (no 'cfg'/'model' entries)")
    cfg = data["cfg"].get("model")
    if not isinstance(cfg, argparse.Namespace):
        raise BadCheckpoint.at(path, "cfg.model", f"is {type(cfg).__name__}; expected fair-esm's argparse.Namespace")
    fields = vars(cfg)
    check_shape(path, *((f"cfg.model.{key}", fields.get(key))
                        for key in ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads")))
    if not isinstance(fields.get("token_dropout"), bool):
        raise BadCheckpoint.at(path, "cfg.model.token_dropout", f"is {fields.get('token_dropout')!r}; expected true or false")
    return cfg


def _check_tensors(path: Path, entries: dict) -> None:
    for key, value in entries.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise BadCheckpoint.at(path, f"model[{key!r}]", f"is {type(value).__name__}; expected a tensor")


def fair_esm_shape(path: Path) -> tuple[int, int, int]:
    """(layers, embed_dim, heads) from a fair-esm file's config, without reading the weights."""
    cfg = _fair_esm_config(path, safe_load(path))
    return cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads


def regression_candidates(checkpoint: Path) -> list[Path]:
    """Where a checkpoint's contact-regression file may be: beside it, and, for a symlink (a
    model store's blob, a shared cache), beside its target too."""
    places = [regression_path(checkpoint)]
    if checkpoint.is_symlink():
        places.append(regression_path(checkpoint.resolve()))
    return list(dict.fromkeys(places))


def load(name: str, path: Path) -> LoadedModel:
    """Build an ESM-2 model from a fair-esm checkpoint through fair-esm's own loader."""
    model_data = safe_load(path)
    _fair_esm_config(path, model_data)
    _check_tensors(path, model_data["model"])
    places = regression_candidates(path)
    regression_file = next((p for p in places if p.is_file()), None)
    regression_data = None
    if regression_file is None:
        log.warning("%s: contact regression weights not found (looked for %s): model %s will refuse contacts",
                    path, " and ".join(map(str, places)), name)
    else:
        log.info("%s: contact regression weights from %s", name, regression_file)
        regression_data = safe_load(regression_file)
        if not isinstance(regression_data, dict) or not isinstance(regression_data.get("model"), dict):
            raise BadCheckpoint.at(regression_file, "model", "missing; expected the contact head's tensors")
        _check_tensors(regression_file, regression_data["model"])
    random_weights = bool(model_data.get(RANDOM_WEIGHTS_KEY, False))
    try:  # fair-esm picks its ESM-2 code path by the name prefix "esm2".
        model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2", model_data, regression_data)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:  # names the missing, extra or misshapen keys
        files = path if regression_file is None else f"{path} (with {regression_file})"
        raise BadCheckpoint(f"{files}: the weights do not fit the config: {exc}") from exc
    model.eval().requires_grad_(False)
    return LoadedModel(
        name=name,
        model=model,
        alphabet=alphabet,
        checkpoint=path,
        random_weights=random_weights,
        has_contact_regression=regression_data is not None,
        source=path.name,
        source_format=FAIR_ESM,
        contacts_unavailable="" if regression_file else " or ".join(dict.fromkeys(p.name for p in places))
                                                        + " was not found",
    )

