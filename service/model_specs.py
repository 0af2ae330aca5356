"""What to serve: one ModelSpec per model, from a models file (TOML) or from the flags.

    # models.toml: each table under [models] is one served model, named by its key.
    [models.esm2-8m]                      # standard name: fair-esm file, found or downloaded
    device = "cpu"

    [models.esm2-ft]
    source = "hf:my-org/esm2-650m-ft"     # or "/models/ft/" or "/models/esm2_t33_650M_UR50D.pt"
    device = "cuda:0"
    precision = "bf16"
    max_batch_tokens = 16384

Keys a model leaves out take the server's flags (or ESM_* variables), so flags are the
defaults for every model in the file. The keys and their checks are service.config's
per-model settings (ModelSettings): declared and validated once, for flags and file alike. Without a file, --models and --checkpoint describe
the models and the flags apply to all of them, as before.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from service.config import MODEL_KEYS, ModelSettings, ModelSpec

__all__ = ["MODEL_KEYS", "BadModelsConfig", "ModelSpec", "from_file", "from_flags"]


class BadModelsConfig(ValueError):
    """The models file or --models/--checkpoint flags are wrong; the message says where."""


def _spec(defaults: ModelSettings, values: dict, where: str, strict: bool = False) -> ModelSpec:
    """The defaults overridden by `values`, checked by the declaration (strictly for a file: TOML
    has types, so a string where a number belongs is a mistake, not something to convert)."""
    try:
        return ModelSpec.model_validate({**defaults.model_dump(), **values}, strict=strict)
    except ValidationError as exc:
        problems = (f"{e['loc'][0]} = {e['input']!r}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise BadModelsConfig(f"{where}: {'; '.join(problems)}") from None


def from_flags(models: str, checkpoint_entries: list[str], defaults: ModelSettings) -> list[ModelSpec]:
    """--models a,b and --checkpoint NAME=SOURCE (repeatable)."""
    sources = {}
    for entry in checkpoint_entries:
        name, sep, source = entry.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise BadModelsConfig(f"--checkpoint {entry!r}: expected NAME=SOURCE (a path or hf:org/name)")
        sources[name.strip()] = source.strip()
    names = list(dict.fromkeys(n.strip() for n in models.split(",") if n.strip()))
    if not names:
        raise BadModelsConfig("--models: no model named")
    return [_spec(defaults, {"name": n, "source": sources.get(n)}, f"model {n}") for n in names]


def from_file(path: Path, defaults: ModelSettings) -> list[ModelSpec]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BadModelsConfig(f"models file {path}: {exc}") from exc
    unknown_top = sorted(set(data) - {"models"})
    tables = data.get("models")
    if unknown_top or not isinstance(tables, dict) or not tables:
        raise BadModelsConfig(
            f"models file {path}: expected only [models.<name>] tables"
            + (f" (unknown: {', '.join(unknown_top)})" if unknown_top else "")
        )
    specs = []
    for name, table in tables.items():
        where = f"models file {path}, [models.{name}]"
        if not isinstance(table, dict):
            raise BadModelsConfig(f"{where}: expected a table of settings")
        unknown = sorted(set(table) - set(MODEL_KEYS))
        if unknown:
            raise BadModelsConfig(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(MODEL_KEYS)})")
        specs.append(_spec(defaults, {**table, "name": name}, where, strict=True))
    return specs
