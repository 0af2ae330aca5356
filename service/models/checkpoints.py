"""Find and load fair-esm ESM-2 checkpoints, safely; the LoadedModel every format becomes.

A checkpoint is fair-esm's `<stem>.pt` (model weights plus an `argparse.Namespace`
config) and its `<stem>-contact-regression.pt`. Files are unpickled with torch's
`weights_only=True` loader, allowing exactly one extra class: `argparse.Namespace`.
Hugging Face checkpoints are read by service.models.hf_checkpoints into the same module.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import esm
import numpy as np
import torch

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
        return sum(p.numel() for p in self.model.parameters())

    def tokenize(self, tokens: tuple[str, ...]) -> np.ndarray:
        """int64 [BOS, residues..., EOS] for validated tokens (letters and `<mask>`).

        The alphabet's index directly: fair-esm's tokenizer would drop whitespace silently."""
        alphabet = self.alphabet
        ids = [alphabet.cls_idx, *(alphabet.tok_to_idx[t] for t in tokens), alphabet.eos_idx]
        return np.array(ids, dtype=np.int64)


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
        raise RuntimeError(
            f"could not load checkpoint {path}: {exc}. Only fair-esm ESM-2 checkpoints "
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
            f"{hub_checkpoint_dir()}, or pass --checkpoint {name}=/path/to/{stem}.pt."
        )
    else:
        fetched = ""
        how = f"Pass --checkpoint {name}=/path/to/checkpoint.pt (a fair-esm ESM-2 .pt file)."
    raise CheckpointNotFound(
        f"no checkpoint for model {name!r}. Looked in:\n{looked}\n{fetched} {how}".replace("\n ", "\n")
    )


def fair_esm_shape(path: Path) -> tuple[int, int, int]:
    """(layers, embed_dim, heads) from a fair-esm file's config, without reading the weights."""
    data = safe_load(path)
    cfg = data.get("cfg", {}).get("model") if isinstance(data.get("cfg"), dict) else None
    if cfg is None:
        raise RuntimeError(f"{path} is not a fair-esm ESM-2 checkpoint (no 'cfg'/'model' entries)")
    return cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads


def load(name: str, path: Path) -> LoadedModel:
    """Build an ESM-2 model from a fair-esm checkpoint through fair-esm's own loader."""
    model_data = safe_load(path)
    if "cfg" not in model_data or "model" not in model_data:
        raise RuntimeError(f"{path} is not a fair-esm ESM-2 checkpoint (no 'cfg'/'model' entries)")
    regression_file = regression_path(path)
    regression_data = safe_load(regression_file) if regression_file.is_file() else None
    if regression_data is None:
        log.warning("%s not found: model %s will refuse contacts", regression_file, name)
    random_weights = bool(model_data.get(RANDOM_WEIGHTS_KEY, False))
    # fair-esm picks its ESM-2 code path by the name prefix "esm2".
    model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2", model_data, regression_data)
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
    )

