"""The weights fingerprint: which weights a served model's outputs came from.

A SHA-256 over the model's state dict as loaded (before any precision cast), key by key in
sorted order: each key's name, dtype, shape and bytes. Two servers that report the same
fingerprint computed with the same weights, whatever file format held them; a fine-tune,
another seed or a damaged copy reports another one. Precision is reported beside it, not in it.

Hashing reads every weight once (one SHA-256 pass; docs/api.md, "Provenance", has the figures). The result is cached beside the
checkpoint, keyed by its files' size, mtime, ctime and inode, so that a restart skips the hash
and a changed file is hashed again. A checkpoint directory that cannot be written (a read-only
volume in a container image) keeps the cache in the user's cache directory instead
($XDG_CACHE_HOME/esm2-service/fingerprints); when neither can be written, the hash is computed
at every start and nothing fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ALGORITHM = "sha256-state-dict-v1"  # what the cache holds: a change of the recipe misses old entries
PREFIX = "sha256:"
BESIDE_FILE_SUFFIX = ".fingerprint.json"  # <checkpoint>.pt.fingerprint.json
DIRECTORY_CACHE_NAME = "weights.fingerprint.json"  # inside a Hugging Face directory
_HASH_CHUNK_BYTES = 64 << 20


def state_dict_fingerprint(model: torch.nn.Module) -> str:
    """`sha256:<64 hex>` of the model's state dict."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0".encode())
        raw = tensor.reshape(-1).view(torch.uint8).numpy()  # a view: no copy of the weights
        for start in range(0, raw.size, _HASH_CHUNK_BYTES):
            digest.update(raw[start:start + _HASH_CHUNK_BYTES])
    return PREFIX + digest.hexdigest()


def weight_files(checkpoint: Path) -> list[Path]:
    """The files a checkpoint's weights are read from: a .pt and the contact-regression file beside
    it, or every file of a Hugging Face directory but the cache itself."""
    if checkpoint.is_dir():
        return sorted(f for f in checkpoint.iterdir() if f.is_file() and f.name != DIRECTORY_CACHE_NAME)
    regression = checkpoint.with_name(checkpoint.stem + "-contact-regression.pt")
    return [checkpoint, *([regression] if regression.is_file() else [])]


def _stamp(files: list[Path]) -> list[list]:
    """What changes when any file is rewritten, replaced or touched (ctime cannot be set back)."""
    stamps = []
    for path in files:
        stat = path.stat()
        stamps.append([path.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino])
    return stamps


def cache_locations(checkpoint: Path) -> list[Path]:
    """Where the cache may be, in the order tried: beside the checkpoint, then the user's cache."""
    beside = (checkpoint / DIRECTORY_CACHE_NAME if checkpoint.is_dir()
              else checkpoint.with_name(checkpoint.name + BESIDE_FILE_SUFFIX))
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:32]
    return [beside, home / "esm2-service" / "fingerprints" / f"{key}.json"]


def _read(location: Path, stamp: list[list]) -> str | None:
    try:
        entry = json.loads(location.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("algorithm") != ALGORITHM or entry.get("files") != stamp:
        return None
    value = entry.get("fingerprint")
    return value if isinstance(value, str) and value.startswith(PREFIX) else None


def _write(location: Path, entry: dict) -> bool:
    """Atomically (replicas starting together may share a directory); False where it cannot be written."""
    temporary = None
    try:
        location.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=location.parent, prefix=location.name, suffix=".tmp",
                                         delete=False) as handle:
            temporary = Path(handle.name)
            json.dump(entry, handle)
        os.replace(temporary, location)
        return True
    except OSError as exc:
        log.debug("cannot cache the weights fingerprint at %s: %s", location, exc)
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        return False


def fingerprint(model: torch.nn.Module, checkpoint: Path) -> str:
    """The model's fingerprint, from the cache when its files have not changed since it was written."""
    stamp = _stamp(weight_files(checkpoint))
    locations = cache_locations(checkpoint)
    for location in locations:
        found = _read(location, stamp)
        if found is not None:
            log.info("%s: weights fingerprint %s (cached in %s)", checkpoint.name, found, location)
            return found
    value = state_dict_fingerprint(model)
    entry = {"algorithm": ALGORITHM, "fingerprint": value, "files": stamp}
    where = next((location for location in locations if _write(location, entry)), None)
    log.info("%s: weights fingerprint %s (%s)", checkpoint.name, value,
             f"cached in {where}" if where else "no writable place to cache it: computed at every start")
    return value
