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
defaults for every model in the file. Without a file, --models and --checkpoint describe
the models and the flags apply to all of them, as before.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from service.models import batch_budget
from service.models.precision import PRECISIONS
from service.engine.scheduler import BatchLimits

ATTENTION = ("fast", "exact")
LAYOUTS = ("padded", "packed")


class BadModelsConfig(ValueError):
    """The models file or --models/--checkpoint flags are wrong; the message says where."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str | None = None  # None: the standard fair-esm name
    device: str = "auto"
    precision: str = "fp32"
    attention: str = "fast"
    max_batch_tokens: str = "device"  # a number of tokens, "device" or "sweep" (service.models.batch_budget)
    # The scheduler's own defaults (service.engine.scheduler.BatchLimits explains each).
    max_batch_size: int = BatchLimits.max_batch_size
    max_wait_ms: float = BatchLimits.max_wait_s * 1000
    max_queue_items: int = BatchLimits.max_queue_items
    min_padding_efficiency: float = BatchLimits.min_padding_efficiency
    max_batch_token_pairs: int = BatchLimits.max_batch_token_pairs
    aging: float = BatchLimits.aging
    layout: str = "padded"  # "packed": batches without attention maps run unpadded (service.models.packed)


_TYPES = {"source": str, "device": str, "precision": str, "attention": str, "max_batch_tokens": (int, str),
          "layout": str, "max_batch_size": int, "max_wait_ms": (int, float), "max_queue_items": int,
          "min_padding_efficiency": (int, float), "max_batch_token_pairs": int, "aging": (int, float)}
MODEL_KEYS = tuple(f.name for f in fields(ModelSpec) if f.name != "name")


def defaults_from_args(args) -> ModelSpec:
    """The per-model settings the flags give (a template; name and source unset)."""
    return ModelSpec(
        name="", device=args.device, precision=args.precision, attention=args.attention, layout=args.layout,
        max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue_items=args.max_queue_items, min_padding_efficiency=args.min_padding_efficiency,
        max_batch_token_pairs=args.max_batch_token_pairs, aging=args.aging,
    )


def _check(spec: ModelSpec, where: str) -> ModelSpec:
    problems = []
    if spec.precision not in PRECISIONS:
        problems.append(f"precision {spec.precision!r} is not one of {', '.join(PRECISIONS)}")
    if spec.attention not in ATTENTION:
        problems.append(f"attention {spec.attention!r} is not one of {', '.join(ATTENTION)}")
    if spec.layout not in LAYOUTS:
        problems.append(f"layout {spec.layout!r} is not one of {', '.join(LAYOUTS)}")
    try:
        spec = replace(spec, max_batch_tokens=batch_budget.parse_setting(str(spec.max_batch_tokens)))
    except ValueError as exc:
        problems.append(f"max_batch_tokens: {exc}")
    for key in ("max_batch_size", "max_queue_items", "max_batch_token_pairs"):
        if getattr(spec, key) < 1:
            problems.append(f"{key} must be at least 1")
    if spec.aging < 0:
        problems.append("aging must not be negative")
    if not 0 <= spec.min_padding_efficiency <= 1:
        problems.append("min_padding_efficiency must be between 0 and 1")
    if spec.max_wait_ms < 0:
        problems.append("max_wait_ms must not be negative")
    if problems:
        raise BadModelsConfig(f"{where}: " + "; ".join(problems))
    return spec


def from_flags(models: str, checkpoint_entries: list[str], defaults: ModelSpec) -> list[ModelSpec]:
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
    return [_check(replace(defaults, name=n, source=sources.get(n)), f"model {n}") for n in names]


def from_file(path: Path, defaults: ModelSpec) -> list[ModelSpec]:
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
        for key, value in table.items():
            if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
                raise BadModelsConfig(f"{where}: {key} = {value!r} has the wrong type")
        specs.append(_check(replace(defaults, name=name, **table), where))
    return specs
