"""JSON schema of the REST request bodies, as served at /api/v3/schema/<model>/<action>/.

BioLM's Python client reads `properties.items.maxItems` to size its batches.
"""

from __future__ import annotations

from esm2_wire.output_kinds import ALIASES, NAMES
from esm2_wire.vocabulary import Limits


# Longest params list: more layers than any ESM-2 has, every output several times over.
MAX_LIST_PARAM = 64


def request_schema(model: str, action: str, limits: Limits) -> dict:
    sequence_pattern = "^[ACDEFGHIKLMNPQRSTVWYBXZUO-]+$" if action == "encode" else (
        "^([ACDEFGHIKLMNPQRSTVWYBXZUO]|<mask>)*<mask>([ACDEFGHIKLMNPQRSTVWYBXZUO]|<mask>)*$"
    )
    params = {
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
    return {
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
                    "properties": {
                        "sequence": {
                            "type": "string",
                            "minLength": 1,
                            # <mask> counts as one residue; the server checks the exact length.
                            "maxLength": limits.max_sequence_length * (6 if action == "predict" else 1),
                            "pattern": sequence_pattern,
                        }
                    },
                },
            },
        },
    }
