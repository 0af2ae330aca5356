"""The OpenAPI 3.1 document of the JSON API, committed as service/api/openapi.json.

    python -m service.api.openapi > service/api/openapi.json

The server serves the committed file at GET /api/v3/openapi.json; a test checks that it
equals what this module builds, so request bodies always follow service.api.request_schema.
Limits are the defaults (--max-items, --max-sequence-length); a server started with
other limits enforces its own, which GET /api/v3/schema/{model}/{action}/ reports.
"""

from __future__ import annotations

import json
import sys

from esm2_wire.output_kinds import NAMES as INCLUDE_VALUES
from esm2_wire.provenance import HEADERS
from esm2_wire.vocabulary import Limits
from service.api.request_schema import ACTIONS, request_schema

NUMBERS = {"type": "array", "items": {"type": "number"}}
MATRIX = {"type": "array", "items": NUMBERS}


def _layer(key: str, value: dict) -> dict:
    return {"type": "array", "items": {"type": "object", "required": ["layer", key],
                                        "properties": {"layer": {"type": "integer", "minimum": 0}, key: value}}}


ENCODE_RESULT = {
    "type": "object",
    "description": "Outputs of one item; only those `include` asked for are present.",
    "required": ["sequence_index"],
    "additionalProperties": False,
    "properties": {
        "sequence_index": {"type": "integer", "minimum": 0},
        "embeddings": _layer("embedding", NUMBERS),
        "bos_embeddings": _layer("embedding", NUMBERS),
        "per_token_embeddings": _layer("embeddings", MATRIX),
        "contacts": MATRIX,
        "attentions": MATRIX,
        "logits": MATRIX,
        "vocab_tokens": {"type": "array", "items": {"type": "string"}},
    },
}
PREDICT_RESULT = {
    "type": "object",
    "required": ["sequence_index", "logits", "sequence_tokens", "vocab_tokens"],
    "additionalProperties": False,
    "properties": {
        "sequence_index": {"type": "integer", "minimum": 0},
        "logits": MATRIX,
        "sequence_tokens": {"type": "array", "items": {"type": "string"}},
        "vocab_tokens": {"type": "array", "items": {"type": "string"}},
    },
}
LOG_PROB_RESULT = {
    "type": "object",
    "description": "BioLM's log_prob: the sum over positions holding a standard amino acid of the residue's "
                   "log-probability (log-softmax over the 20 standard amino acids, one unmasked pass).",
    "required": ["log_prob"],
    "additionalProperties": False,
    "properties": {"log_prob": {"type": "number"}},
}
SCORE_RESULT = {
    "type": "object",
    "description": "Scores of one item's variants, in request order; pll adds the pseudo-log-likelihoods.",
    "required": ["sequence_index", "scores"],
    "additionalProperties": False,
    "properties": {
        "sequence_index": {"type": "integer", "minimum": 0},
        "scores": {"type": "array", "items": {"type": ["number", "null"]}},
        "pseudo_log_likelihood": {"type": ["number", "null"]},
        "scored_positions": {"type": "integer", "minimum": 0},
        "variant_pseudo_log_likelihoods": {"type": "array", "items": {"type": ["number", "null"]}},
    },
}
PROVENANCE = {
    "type": "object",
    "description": "Where the results came from (score only: BioLM's actions carry it in the x-esm-* headers alone, "
                   "so that their bodies keep BioLM's shape).",
    "required": list(HEADERS),
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string"},
        "weights_fingerprint": {"type": "string", "description": "sha256 of the state dict as loaded"},
        "random_weights": {"type": "boolean", "description": "true: a test checkpoint, its outputs are meaningless"},
        "precision": {"type": "string"},
        "server_version": {"type": "string"},
    },
}
# Response headers of every result (esm2_wire.provenance).
PROVENANCE_HEADERS = {
    HEADERS["model"]: "The served model that computed the results",
    HEADERS["weights_fingerprint"]: "sha256 of the model's state dict as loaded: equal weights, equal fingerprint",
    HEADERS["random_weights"]: "true when the model has random weights (a test or demo checkpoint): the results "
                               "are meaningless",
    HEADERS["precision"]: "fp32, bf16, fp16 or int8",
    HEADERS["server_version"]: "The esm2-service version",
}
SUMMARIES = {
    "encode": "Embeddings, contacts, attentions and logits",
    "predict": "Masked-token logits",
    "log_prob": "Log-probability of each sequence (BioLM's log_prob)",
    "score": "Variant scores: masked_marginal, wt_marginal or pll (this server's extension, not a BioLM action)",
}
ERROR = {
    "type": "object",
    "description": "BioLM's error shape. `message` repeats `detail`.",
    "required": ["detail", "errors", "status_code", "code", "message"],
    "properties": {
        "detail": {"type": "string", "minLength": 1},
        "errors": {
            "type": "array",
            "description": "One entry per problem with a field: the item index (null outside items) and the field.",
            "items": {
                "type": "object",
                "required": ["index", "field", "detail"],
                "properties": {"index": {"type": ["integer", "null"]}, "field": {"type": "string"},
                               "detail": {"type": "string"}},
            },
        },
        "status_code": {"type": "integer"},
        "code": {"type": "string", "description": "gRPC status name (server) or Envoy's response code details"},
        "message": {"type": "string"},
        "request_id": {"type": ["string", "null"],
                       "description": "This request's x-request-id (also a response header): it names the request "
                                      "in the server's logs and traces"},
    },
}
MODEL_INFO = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "checkpoint": {"type": "string"}, "num_layers": {"type": "integer"},
        "embed_dim": {"type": "integer"}, "attention_heads": {"type": "integer"},
        "parameters": {"type": "string", "description": "int64, written as a string by the proto JSON mapping"},
        "random_weights": {"type": "boolean"}, "ready": {"type": "boolean"}, "max_items": {"type": "integer"},
        "max_sequence_length": {"type": "integer"}, "device": {"type": "string"}, "precision": {"type": "string"},
        "weights_fingerprint": {"type": "string", "description": "sha256 of the state dict as loaded"},
        "server_version": {"type": "string"},
    },
}

_ERRORS = {
    "400": "Malformed request: invalid JSON, unknown field, wrong type, bad sequence, bad gzip body, malformed path "
           "or header",
    "401": "Missing or invalid API key (when keys are configured)",
    "404": "Unknown model, action or path",
    "413": "Request body over --max-request-bytes, as sent or after gzip decompression",
    "414": "URL path over --max-path-bytes",
    "415": "Content-Type other than application/json, or a Content-Encoding other than gzip",
    "429": "The server's queue is full; retry after Retry-After seconds",
    "431": "Request headers over --max-header-bytes",
    "503": "No healthy server; retry after Retry-After seconds",
    "504": "The request took longer than --request-timeout-s",
}


def _responses(ok: dict, ok_description: str, codes: tuple[str, ...], headers: dict | None = None) -> dict:
    out = {"200": {"description": ok_description, "content": {"application/json": {"schema": ok}}}}
    if headers:
        out["200"]["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                                 for name, text in headers.items()}
    for code in codes:
        out[code] = {"description": _ERRORS[code], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return out


MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "Served model name, e.g. esm2-8m"}
ALL_CODES = ("400", "401", "404", "413", "414", "415", "429", "431", "503", "504")
GET_CODES = ("400", "404", "414", "431", "503", "504")


# The actions take an API key when the server has any (--api-keys-file / ESM_API_KEYS); the
# schema, model list, this document and health stay open (service.api.auth.OPEN_METHODS).
# As HTTP bearer, Swagger UI's Authorize button sends `Authorization: Bearer <key>`, which the
# server takes as it takes BioLM's `Token <key>`.
API_KEY = "apiKey"
SECURITY_SCHEMES = {API_KEY: {
    "type": "http", "scheme": "bearer",
    "description": "Only where the server has API keys: `Authorization: Bearer <key>`, or BioLM's "
                   "`Authorization: Token <key>`. Without a valid key the actions answer 401.",
}}


def _action(action: str, result: dict, limits: Limits) -> dict:
    body = request_schema("{model}", action, limits)
    del body["$schema"], body["title"]
    return {
        "post": {
            "operationId": action,
            "summary": SUMMARIES[action],
            "parameters": [MODEL],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}},
                            "description": "Optionally gzip-compressed (Content-Encoding: gzip)."},
            "responses": _responses({"type": "object", "required": ["results"], "additionalProperties": False,
                                     "properties": {"results": {"type": "array", "items": result},
                                                    **({"provenance": PROVENANCE} if action == "score" else {})}},
                                    "One result per item, in request order", ALL_CODES, PROVENANCE_HEADERS),
            # An API key where the server requires them; none where it does not ({}).
            "security": [{API_KEY: []}, {}],
        }
    }


# One line of score_stream's newline-delimited JSON (service.api.rendering.score_stream_json_line):
# progress, and each item's scores as their passes finish.
SCORE_STREAM_LINE = {
    "type": "object",
    "description": "One line: the passes done so far of all the request's passes, and, where a block of scores "
                   "is ready, the item (sequence_index) and the variants (variant_indexes) it scores.",
    "required": ["passes_done", "passes_total"],
    "properties": {
        "passes_done": {"type": "integer", "minimum": 0},
        "passes_total": {"type": "integer", "minimum": 0},
        "sequence_index": {"type": "integer", "minimum": 0},
        "variant_indexes": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "scores": {"type": "array", "items": {"type": ["number", "null"]}},
        "variant_pseudo_log_likelihoods": {"type": "array", "items": {"type": ["number", "null"]}},
        "pseudo_log_likelihood": {"type": ["number", "null"]},
        "scored_positions": {"type": "integer", "minimum": 0},
    },
}


def _score_stream(limits: Limits) -> dict:
    """score's body, answered as newline-delimited JSON while the passes run (idle timeout, no total one)."""
    operation = _action("score", SCORE_RESULT, limits)
    post = operation["post"]
    post["operationId"] = "score_stream"
    post["summary"] = "score, streamed: one JSON line per block of scores as it is ready, with progress"
    ok = post["responses"]["200"]
    ok["description"] = "Newline-delimited JSON (application/x-ndjson), one object per line"
    ok["content"] = {"application/x-ndjson": {"schema": SCORE_STREAM_LINE}}
    return operation


def document(limits: Limits = Limits()) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ESM-2 inference service, BioLM-compatible JSON API",
            "version": "3",
            "description": "ESM-2 protein language models through the Envoy gateway. Outputs: "
                           + ", ".join(INCLUDE_VALUES) + ". Large per-token outputs belong on the streaming gRPC RPCs.",
        },
        "paths": {
            "/api/v3/{model}/encode/": _action("encode", ENCODE_RESULT, limits),
            "/api/v3/{model}/predict/": _action("predict", PREDICT_RESULT, limits),
            "/api/v3/{model}/log_prob/": _action("log_prob", LOG_PROB_RESULT, limits),
            "/api/v3/{model}/score/": _action("score", SCORE_RESULT, limits),
            "/api/v3/{model}/score_stream/": _score_stream(limits),
            "/api/v3/schema/{model}/{action}/": {
                "get": {
                    "operationId": "schema",
                    "summary": "JSON schema of an action's request body",
                    "parameters": [MODEL, {"name": "action", "in": "path", "required": True,
                                           "schema": {"type": "string", "enum": list(ACTIONS)}}],
                    "responses": _responses({"type": "object"}, "A JSON schema (draft 2020-12)", GET_CODES),
                }
            },
            "/api/v3/models": {
                "get": {
                    "operationId": "models",
                    "summary": "The served models, their shapes and readiness",
                    "responses": _responses({"type": "object", "properties": {"models": {"type": "array", "items": MODEL_INFO}}},
                                            "Served models", GET_CODES),
                }
            },
            "/api/v3/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": _responses({"type": "object"}, "OpenAPI 3.1 document", GET_CODES),
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "200 while the server passes Envoy's gRPC health checks, else 503",
                    "responses": {"200": {"description": "Serving"}, "503": {"description": "Not serving"}},
                }
            },
        },
        "components": {"schemas": {"Error": ERROR}, "securitySchemes": SECURITY_SCHEMES},
    }


def as_served(document: bytes, api_keys_required: bool) -> bytes:
    """The committed document as a server serves it: without API keys, no operation asks for one
    (the docs page then shows no padlocks and no Authorize button)."""
    if api_keys_required:
        return document
    parsed = json.loads(document)
    for operations in parsed.get("paths", {}).values():
        for operation in operations.values():
            operation.pop("security", None)
    parsed.get("components", {}).pop("securitySchemes", None)
    return (json.dumps(parsed, indent=1, ensure_ascii=True) + "\n").encode()


def render() -> bytes:
    return (json.dumps(document(), indent=1, ensure_ascii=True) + "\n").encode()


if __name__ == "__main__":
    sys.stdout.buffer.write(render())
