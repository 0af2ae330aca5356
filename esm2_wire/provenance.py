"""Where a result came from: the served model, its weights fingerprint, whether the weights are
random, the precision it computed in and the server's version.

The server sends it with every result (gRPC trailing metadata, the JSON API's response headers,
ListModels' ModelInfo); the client and the `esm2` CLI read it back and write it into the files
they make, so that two files say whether they came from the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

# Response metadata (gRPC) and headers (JSON API) of every result, one per field.
HEADERS = {
    "model": "x-esm-model",
    "weights_fingerprint": "x-esm-weights-fingerprint",
    "random_weights": "x-esm-random-weights",
    "precision": "x-esm-precision",
    "server_version": "x-esm-server-version",
}


@dataclass(frozen=True)
class Provenance:
    model: str
    weights_fingerprint: str  # "sha256:<64 hex>" of the state dict (service.models.fingerprint)
    random_weights: bool  # a test checkpoint: its outputs are meaningless
    precision: str  # fp32, bf16, fp16 or int8
    server_version: str

    @classmethod
    def of_model_info(cls, info) -> Provenance:
        """From a ListModels ModelInfo."""
        return cls(info.name, info.weights_fingerprint, info.random_weights, info.precision, info.server_version)

    @classmethod
    def of_metadata(cls, metadata: Iterable[tuple[str, str]] | Mapping[str, str]) -> Provenance | None:
        """From gRPC metadata or HTTP headers (any case); None when they carry none."""
        pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
        found = {key.lower(): value for key, value in pairs or () if isinstance(value, str)}
        if HEADERS["weights_fingerprint"] not in found:
            return None
        values = {name: found.get(header, "") for name, header in HEADERS.items()}
        return cls(**{**values, "random_weights": values["random_weights"] == "true"})

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((header, self.text(name)) for name, header in HEADERS.items())

    def text(self, name: str) -> str:
        value = getattr(self, name)
        return ("true" if value else "false") if isinstance(value, bool) else value

    def as_dict(self) -> dict:
        return asdict(self)

    def differs_from(self, other: Mapping[str, object]) -> list[str]:
        """The weight-identifying fields in which `other` (as as_dict wrote it) differs from this."""
        return [name for name in ("weights_fingerprint", "random_weights")
                if str(other.get(name)) != str(getattr(self, name))]
