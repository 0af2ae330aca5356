"""The hand-off type between the API layer and the engine: one sequence, ready for a model.

Torch-free on purpose: the scheduler, the result cache and the handlers pass it around and
hash it without importing torch; only the worker turns the token ids into a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esm2_wire import output_kinds
from esm2_wire.output_kinds import OutputKind


@dataclass(frozen=True, eq=False)
class ModelInput:
    """One sequence, ready for the model: all the worker needs to compute its outputs."""

    model: str
    token_ids: np.ndarray  # int64 [BOS, residues..., EOS], from LoadedModel.tokenize
    outputs: frozenset[OutputKind]
    layers: tuple[int, ...]  # non-negative; used by the per-layer outputs
    # Whose result this is (service.api.auth.ApiKeys.tenant): equal items of different tenants
    # are neither merged nor answered from each other's cache entries, so that the time of an
    # answer tells no caller what another one asked. "": the one shared tenant.
    tenant: str = ""
    num_layers: int = 0  # the model's transformer layers; 0: unknown (its work is then counted as a full pass)

    @property
    def length(self) -> int:  # tokens, BOS and EOS included
        return int(self.token_ids.size)

    @property
    def needs_maps(self) -> bool:
        return output_kinds.needs_maps(self.outputs)

    @property
    def depth_share(self) -> float:
        """The share of a full forward pass this item needs: its layers to run, plus one for the
        embedding and the head, over the model's layers plus one (the work estimate's depth factor)."""
        if not self.num_layers:
            return 1.0
        kept = self.layers if output_kinds.per_layer(self.outputs) else ()
        run = output_kinds.layers_to_run(self.outputs, kept, self.num_layers)
        return (run + 1) / (self.num_layers + 1)
