"""The outputs of one sequence as numpy arrays: what the model worker produces, and what
a client rebuilds from a stream (kept free of torch so that clients import it cheaply)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ItemResult:
    """float32 outputs of one item, residues only (BOS/EOS excluded); absent ones stay empty/None."""

    mean: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [embed_dim]
    bos: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [embed_dim]
    per_token: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [L, embed_dim]
    contacts: np.ndarray | None = None  # [L, L]
    attentions: np.ndarray | None = None  # [L, L]
    logits: np.ndarray | None = None  # [L, 20]
