"""The outputs of one sequence as numpy arrays: what the model worker produces, and what
a client rebuilds from a stream."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from esm2_wire.output_kinds import OutputKind


@dataclass
class ItemResult:
    """float32 outputs of one item, residues only (BOS/EOS excluded); absent ones stay empty/None.

    Field names are OutputKind values."""

    mean: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [embed_dim]
    bos: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [embed_dim]
    per_token: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [L, embed_dim]
    contacts: np.ndarray | None = None  # [L, L]
    attentions: np.ndarray | None = None  # [L, L]
    logits: np.ndarray | None = None  # [L, 20]

    def __repr__(self) -> str:
        return short_repr(self)

    def get(self, kind: OutputKind):
        """A per-layer kind's {layer: array}, or another kind's array (None when absent)."""
        return getattr(self, kind.value)

    def put(self, kind: OutputKind, array: np.ndarray, layer: int | None = None) -> None:
        if kind.per_layer:
            self.get(kind)[layer] = array
        else:
            setattr(self, kind.value, array)


def short_repr(result) -> str:
    """A result's repr by shapes and dtypes, never values: `ItemOutputs(mean={6: float32[320]},
    contacts=float32[65, 65], ...)`. Absent outputs are left out; long lists give their length."""
    parts = []
    for name in result.__dataclass_fields__:
        value = getattr(result, name)
        if value is None or (isinstance(value, (dict, list)) and not value):
            continue
        parts.append(f"{name}={_describe(value)}")
    return f"{type(result).__name__}({', '.join(parts)})"


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype}[{', '.join(map(str, value.shape))}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {_describe(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list) and len(value) > 4:
        return f"<{len(value)} {type(value[0]).__name__}>"
    return repr(value)
