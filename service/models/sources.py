"""Where a served model's weights come from, and turning them into a LoadedModel.

A source is one of:
- nothing: a standard name (`esm2-8m` ... `esm2-15b`) is looked up as fair-esm's
  `<stem>.pt` in --model-dir, then the torch hub cache, then downloaded from fair-esm's URLs;
- a path to a fair-esm `.pt` file;
- a path to a Hugging Face `save_pretrained` directory (config.json + safetensors);
- `hf:<org>/<name>[@<revision>]`: a Hugging Face hub repo, from the standard HF cache
  ($HF_HOME/hub, $HF_HUB_CACHE), downloaded into it with huggingface_hub unless offline.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from service.models import checkpoints, fingerprint, hf_checkpoints
from service.models.checkpoints import FAIR_ESM, HUGGING_FACE, BadCheckpoint, CheckpointNotFound, LoadedModel, one_line

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Located:
    """A source found on local disk."""

    path: Path  # a .pt file or an HF directory (logs only)
    format: str  # FAIR_ESM or HUGGING_FACE
    display: str  # what callers are shown: file name, directory name or repo id
    # A hub repo (id, revision) whose weights are fetched at load time if the snapshot lacks them,
    # so that the memory check runs on the config before a multi-GB download.
    hub_download: tuple[str, str | None] | None = None


def _hf_cache_dir() -> Path:
    from huggingface_hub import constants  # reads HF_HOME / HF_HUB_CACHE

    return Path(constants.HF_HUB_CACHE)


def _split_repo(spec: str) -> tuple[str, str | None]:
    repo, _, revision = spec[len(HF_PREFIX):].partition("@")
    return repo, revision or None


def locate_hf_repo(name: str, spec: str, allow_download: bool) -> Located:
    """A hub repo's snapshot in the HF cache, downloaded there first when allowed and absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo, revision = _split_repo(spec)
    display = repo if revision is None else f"{repo}@{revision}"
    cache = _hf_cache_dir()
    looked = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / (revision or "<refs/main>")
    fetch = (repo, revision) if allow_download else None
    try:
        snapshot = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True)
        return Located(Path(snapshot), HUGGING_FACE, display, fetch)
    except HFValidationError as exc:
        raise CheckpointNotFound(f"model {name!r}: {spec!r} is not a valid Hugging Face repo id ({exc})") from exc
    except LocalEntryNotFoundError:
        pass
    download_error = None
    if allow_download:
        try:
            log.info("downloading %s's config from the Hugging Face hub into %s", display, cache)
            path = snapshot_download(repo, revision=revision, cache_dir=cache,
                                     allow_patterns=hf_checkpoints.CONFIG_PATTERNS)
            if not (Path(path) / hf_checkpoints.CONFIG_FILE).is_file():
                raise FileNotFoundError(f"the repo has no {hf_checkpoints.CONFIG_FILE}")
            return Located(Path(path), HUGGING_FACE, display, fetch)
        except Exception as exc:  # network, auth, missing repo: reported below with the places looked
            download_error = exc
    fetched = (
        f"Download from the Hugging Face hub failed: {download_error}." if download_error is not None
        else "Downloading is switched off (--offline)."
    )
    raise CheckpointNotFound(
        f"no checkpoint for model {name!r}. Looked in:\n  - {looked}\n{fetched} Put the repo in the "
        f"Hugging Face cache (huggingface-cli download {repo}), or pass --checkpoint {name}=/path/to/save_pretrained/dir."
    )


def locate(name: str, source: str | None, model_dir: Path | None, allow_download: bool) -> Located:
    if source is not None and source.startswith(HF_PREFIX):
        return locate_hf_repo(name, source, allow_download)
    if source is not None:
        path = Path(source).expanduser()
        if path.is_dir():
            if not hf_checkpoints.is_hf_directory(path):
                raise CheckpointNotFound(
                    f"model {name!r}: {path} is a directory without {hf_checkpoints.CONFIG_FILE}; expected a "
                    "Hugging Face save_pretrained directory or a fair-esm .pt file"
                )
            return Located(path, HUGGING_FACE, path.resolve().name)
        return Located(checkpoints.locate(name, path, None, allow_download=False), FAIR_ESM, path.name)
    path = checkpoints.locate(name, None, model_dir, allow_download)
    return Located(path, FAIR_ESM, path.name)


@contextlib.contextmanager
def refusing_bad_files(located: Located):
    """Whatever a malformed file makes the readers raise becomes a BadCheckpoint naming the file,
    so that start-up stops with one line, never a traceback. The checks in checkpoints and
    hf_checkpoints name the key too; this is the net under them."""
    try:
        yield
    except (BadCheckpoint, CheckpointNotFound, MemoryError):
        raise
    except Exception as exc:
        log.debug("reading %s failed", located.path, exc_info=True)
        raise BadCheckpoint(f"{located.path}: cannot be read as a {located.format} checkpoint: "
                            f"{type(exc).__name__}: {one_line(exc)}") from exc


def shape(located: Located) -> tuple[int, int, int]:
    """(layers, embed_dim, heads), read from the config only."""
    with refusing_bad_files(located):
        if located.format == HUGGING_FACE:
            hf = hf_checkpoints.read_config(located.path)
            return hf.num_layers, hf.embed_dim, hf.attention_heads
        return checkpoints.fair_esm_shape(located.path)


def _download_weights(located: Located) -> None:
    """Fetch a hub repo's weights into its snapshot: safetensors, else pytorch_model.bin."""
    from huggingface_hub import snapshot_download

    repo, revision = located.hub_download
    log.info("downloading %s's weights from the Hugging Face hub into %s", located.display, _hf_cache_dir())
    for patterns in (hf_checkpoints.WEIGHT_PATTERNS, hf_checkpoints.BIN_WEIGHT_PATTERNS):
        snapshot_download(repo, revision=revision, cache_dir=_hf_cache_dir(), allow_patterns=patterns)
        if hf_checkpoints.has_weights(located.path):
            return


def load(name: str, located: Located) -> LoadedModel:
    """The model, with its weights fingerprint (hashed once, then cached beside the checkpoint)."""
    with refusing_bad_files(located):
        loaded = _load(name, located)
    loaded.weights_fingerprint = fingerprint.fingerprint(loaded.model, located.path)
    return loaded


def _load(name: str, located: Located) -> LoadedModel:
    if located.format == FAIR_ESM:
        loaded = checkpoints.load(name, located.path)
        loaded.source = located.display
        return loaded
    if located.hub_download is not None and not hf_checkpoints.has_weights(located.path):
        _download_weights(located)
    hf = hf_checkpoints.load_directory(located.path, located.display)
    return LoadedModel(
        name=name,
        model=hf.model,
        alphabet=hf.model.alphabet,
        checkpoint=located.path,
        random_weights=hf.shape.random_weights,
        has_contact_regression=hf.has_contact_head,
        source=located.display,
        source_format=HUGGING_FACE,
        finetuned_from=hf.shape.name_or_path,
        has_lm_head=hf.has_lm_head,
        contacts_unavailable="" if hf.has_contact_head else f"{located.display} has no contact-head weights",
    )
