"""JSON schema of the REST request bodies, as served at /api/v3/schema/<model>/<action>/.

BioLM's Python client reads `properties.items.maxItems` to size its batches.
"""

from __future__ import annotations

from esm2_wire.output_kinds import ALIASES, NAMES
from esm2_wire.variants import VARIANT_PATTERN
from esm2_wire.vocabulary import Limits
from service.api.validation import MAX_LIST_PARAM
from service.api.scoring import DEFAULT_MAX_MUTATIONS, DEFAULT_METHOD, METHODS
from service.api.windows import DEFAULT_LENGTH


# The JSON actions: BioLM's encode, predict and log_prob, and our score.
ACTIONS = ("encode", "predict", "log_prob", "score")


def _window(limits: Limits) -> dict:
    """params.window (our extension), offered where the server sets --max-windowed-residues."""
    return {
        "type": "object", "additionalProperties": False,
        "description": "windowed mode (our extension): items up to max_windowed_residues residues, cut into "
                       "overlapping windows whose outputs are stitched",
        "properties": {
            "length": {"type": "integer", "minimum": 1, "maximum": limits.max_sequence_length,
                       "default": DEFAULT_LENGTH},
            "stride": {"type": "integer", "minimum": 1, "description": "default: half the length"},
        },
    }


def _params(action: str, limits: Limits) -> dict | None:
    """The schema of `params`, or None where the action takes none (log_prob without windows)."""
    params = _plain_params(action)
    if action == "predict" or not limits.max_windowed_residues:
        return params
    params = params or {"type": "object", "additionalProperties": False, "properties": {}}
    params["properties"]["window"] = _window(limits)
    return params


def _plain_params(action: str) -> dict | None:
    if action == "log_prob":
        return None
    if action == "score":
        return {"type": "object", "additionalProperties": False, "properties": {
            "method": {"type": "string", "enum": list(METHODS), "default": DEFAULT_METHOD}}}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "repr_layers": {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_LIST_PARAM, "default": [-1]},
            "include": {
                "type": "array",
                "maxItems": MAX_LIST_PARAM,
                "items": {"type": "string", "enum": [*NAMES, *ALIASES]},
                "default": ["mean"],
            },
        },
    }


def request_schema(model: str, action: str, limits: Limits, max_mutations: int = DEFAULT_MAX_MUTATIONS) -> dict:
    sequence_pattern = "^[ACDEFGHIKLMNPQRSTVWYBXZUO-]+$" if action != "predict" else (
        "^([ACDEFGHIKLMNPQRSTVWYBXZUO]|<mask>)*<mask>([ACDEFGHIKLMNPQRSTVWYBXZUO]|<mask>)*$"
    )
    item = {
        "sequence": {
            "type": "string",
            "minLength": 1,
            # <mask> counts as one residue; the server checks the exact length.
            "maxLength": limits.max_sequence_length * 6 if action == "predict" else max(
                limits.max_sequence_length, limits.max_windowed_residues),
            "pattern": sequence_pattern,
        }
    }
    if action == "score":
        item["variants"] = {"type": "array", "maxItems": max_mutations, "default": [],
                            "items": {"type": "string", "pattern": VARIANT_PATTERN}}
    params = _params(action, limits)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{model} {action} request",
        "type": "object",
        "additionalProperties": False,
        "required": ["items"],
        "properties": {
            "params": params,
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": limits.max_items,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["sequence"],
                    "properties": item,
                },
            },
        },
    }
    if params is None:
        del schema["properties"]["params"]
    return schema
