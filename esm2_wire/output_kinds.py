"""The outputs a caller can ask for: parsed once from `include` names, known everywhere after."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from esm2_wire.proto import pb

ALIASES = {"per_residue": "per_token"}


class OutputKind(enum.Enum):
    """One output of one sequence; the value is its `include` name and ItemResult field."""

    MEAN = "mean"  # [embed_dim] per layer
    PER_TOKEN = "per_token"  # [L, embed_dim] per layer
    BOS = "bos"  # [embed_dim] per layer
    CONTACTS = "contacts"  # [L, L]
    LOGITS = "logits"  # [L, 20]
    ATTENTIONS = "attentions"  # [L, L], mean over layers and heads

    @property
    def per_layer(self) -> bool:
        """One array per requested layer (else one array per sequence)."""
        return self in (OutputKind.MEAN, OutputKind.PER_TOKEN, OutputKind.BOS)

    @property
    def needs_maps(self) -> bool:
        """Computed from attention maps, which the fused attention path does not produce."""
        return self in (OutputKind.CONTACTS, OutputKind.ATTENTIONS)

    @property
    def proto(self) -> int:
        """The esm.v1.OutputKind value that tags this output's stream chunks."""
        return pb.OutputKind.Value(f"OUTPUT_KIND_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> OutputKind:
        """Raises ValueError for values this side does not know."""
        try:
            return cls[pb.OutputKind.Name(value).removeprefix("OUTPUT_KIND_")]
        except (KeyError, ValueError):
            raise ValueError(f"unknown output kind {value}") from None

    @classmethod
    def parse(cls, name: str) -> OutputKind | None:
        """The kind an `include` name (or alias) means; None when it means none."""
        try:
            return cls(ALIASES.get(name, name))
        except ValueError:
            return None


NAMES = tuple(kind.value for kind in OutputKind)


def needs_maps(kinds: Iterable[OutputKind]) -> bool:
    return any(kind.needs_maps for kind in kinds)


def per_layer(kinds: Iterable[OutputKind]) -> bool:
    return any(kind.per_layer for kind in kinds)


def layers_to_run(kinds: Iterable[OutputKind], kept_layers: Iterable[int], num_layers: int) -> int:
    """How many of a model's `num_layers` transformer layers a forward pass must run to produce
    `kinds` and keep the representations of `kept_layers` (non-negative): the deepest layer kept,
    or every layer for logits and attention maps (they read the last layer or all of them)."""
    kinds = frozenset(kinds)
    if OutputKind.LOGITS in kinds or needs_maps(kinds):
        return num_layers
    return min(num_layers, max(kept_layers, default=0))
