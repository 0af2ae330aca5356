"""The JSON API's request bodies, read strictly, and its error bodies, in BioLM's shape.

Envoy passes each encode/predict body through untouched (google.api.HttpBody), so the
rules here are the only ones: the published JSON schema (service.api.request_schema) with
`additionalProperties: false`, plus what JSON text itself must not do (duplicate keys,
NaN, invalid UTF-8). The transcoder's own JSON mapping merged duplicate keys, coerced
scalars into arrays and ignored unknown fields, answering 200 for something other
than what the caller wrote.

gzip bodies are inflated here, never past the request cap: a bomb costs at most
`max_bytes` of memory and is refused with 413 as soon as its output passes the cap.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

import grpc
import jsonschema

from esm2_wire.proto import pb
from esm2_wire.vocabulary import Limits
from service import errors
from service.errors import ELLIPSIS, BadBody, InvalidRequest, Problem, echo
from service.api.request_schema import ACTIONS, request_schema
from service.api.scoring import ScoreLimits, check_variant_bounds
from service.api.validation import check_list_lengths
from service.request_context import REQUEST_ID_HEADER

CONTENT_ENCODING_METADATA = "x-esm-content-encoding"  # set by the gateway's Lua filter


@dataclass
class RequestBody:
    """What a JSON body asks for; each action reads its own fields."""

    sequences: list[str]
    include: list[str] = field(default_factory=list)
    repr_layers: list[int] = field(default_factory=list)
    variants: list[list[str]] = field(default_factory=list)  # score: one list per item
    method: str = ""  # score
    window: pb.Window | None = None  # params.window (windowed mode); None when absent


def _short(value) -> str:
    """A caller's value in a message, bounded as every echo is (errors.echo)."""
    return echo(value if isinstance(value, str) else repr(value))


def inflate(data: bytes, encoding: str, max_bytes: int) -> bytes:
    """The body as the caller wrote it: gzip (one member, CRC and length checked) or identity."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding != "gzip":
        raise BadBody(415, f"Content-Encoding {_short(encoding)} is not supported; send gzip or no encoding")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise BadBody(400, f"the request body could not be decompressed (Content-Encoding: gzip): {exc}") from None
    if len(out) > max_bytes:
        raise BadBody(
            413, f"the decompressed request body exceeds {max_bytes} bytes (--max-request-bytes)"
        )
    if not inflater.eof:
        raise BadBody(400, "the request body could not be decompressed (Content-Encoding: gzip): "
                             "the gzip stream is truncated")
    if inflater.unused_data:
        raise BadBody(400, "the request body could not be decompressed (Content-Encoding: gzip): "
                             "unexpected data after the gzip stream")
    return out


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise BadBody(400, f"invalid JSON: duplicate key {_short(key)} in an object")
        seen[key] = value
    return seen


def _reject_constant(name):
    raise BadBody(400, f"invalid JSON: {name} is not a JSON number")


def _problem(error: jsonschema.ValidationError, limits: Limits) -> Problem:
    """The schema error as a problem of the field it is in (`body`: of the document as a whole)."""
    path = list(error.absolute_path)
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    index = path[1] if path[:1] == ["items"] and len(path) > 1 and isinstance(path[1], int) else None
    return Problem(text or "body", index, _describe(error, limits))


_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def _describe(error: jsonschema.ValidationError, limits: Limits) -> str:
    """A message naming the problem without echoing more than a few characters of the input."""
    kind = error.validator
    if kind == "type":
        wanted = {"array": "an array", "object": "an object", "integer": "an integer", "string": "a string"}
        got = _TYPE_NAMES.get(type(error.instance), "a value")
        if not isinstance(error.instance, (dict, list)) and error.instance is not None:
            got += f" ({_short(error.instance)})"
        return f"expected {wanted.get(error.validator_value, error.validator_value)}, got {got}"
    if kind == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        hint = " (the model comes from the URL path)" if "model" in extra else ""
        allowed = ", ".join(error.schema.get("properties", {}))
        return f"unknown field {', '.join(_short(k) for k in extra)}{hint}; allowed: {allowed}"
    if kind == "required":
        return f"missing required field {_short(error.validator_value[0]) if len(error.validator_value) == 1 else error.validator_value}"
    if kind in ("minItems", "maxItems") and list(error.absolute_path) == ["items"]:
        return f"expected 1 to {limits.max_items} items, got {len(error.instance)}"
    if kind == "maxItems":
        return f"at most {error.validator_value} values, got {len(error.instance)}"
    if kind == "enum":
        return f"unknown value {_short(error.instance)}; allowed: {', '.join(map(str, error.validator_value))}"
    return _clip(error.message, 200)


def _check_list_lengths(document, limits: Limits, score_limits: ScoreLimits) -> None:
    """The schema's maxItems, checked first: a 4 MiB body of 200,000 items, include values or
    variants is refused before the validator visits each of them."""
    if not isinstance(document, dict):
        return
    items = document.get("items")
    if isinstance(items, list) and len(items) > limits.max_items:
        raise InvalidRequest.of(Problem("items", None, f"expected 1 to {limits.max_items} items, got {len(items)}"))
    if isinstance(items, list):
        check_variant_bounds([i["variants"] if isinstance(i, dict) and isinstance(i.get("variants"), list) else []
                              for i in items], score_limits)
    params = document.get("params")
    if isinstance(params, dict):
        check_list_lengths({name: params[name] for name in ("include", "repr_layers")
                            if isinstance(params.get(name), list)})


def _check_colons(text: bytes, limits: Limits, score_limits: ScoreLimits) -> None:
    """A score body's bound on its ':' characters, counted in the raw bytes before the JSON parse.
    In a valid body every ':' ends a key (params, method, items; sequence and variants per item)
    or separates two mutations of a variant; so one with more than the keys' count plus
    --max-score-mutations is refused by a byte count (issue 32's 3.7 MB body: under a
    millisecond, where parsing its JSON took tens)."""
    most = 3 + 2 * limits.max_items + score_limits.max_mutations
    colons = text.count(b":")
    if colons > most:
        raise InvalidRequest.of(Problem(
            "items", None, f"the body holds {colons} ':', more than a request within --max-score-mutations "
                           f"({score_limits.max_mutations} mutations) can hold ({most}: one after each key, one "
                           "between two mutations): split the variants over several requests"))


# Sequence contents (letters, length, masks) are checked by service.api.validation, and variants
# by esm2_wire.variants, whose messages name the position of the first bad character or the
# bad mutation; the schema states the same rules.
_TEXT_RULES = {"pattern", "minLength", "maxLength"}


def _checked_later(error: jsonschema.ValidationError) -> bool:
    path = list(error.absolute_path)
    return error.validator in _TEXT_RULES and (path[-1:] == ["sequence"] or path[-2:-1] == ["variants"])


@dataclass
class BodyParser:
    limits: Limits
    max_bytes: int
    score_limits: ScoreLimits = ScoreLimits()

    def __post_init__(self):
        self._validators = {}
        for action in ACTIONS:
            schema = request_schema("{model}", action, self.limits, self.score_limits.max_mutations)
            self._validators[action] = jsonschema.Draft202012Validator(schema)

    def parse(self, data: bytes, encoding: str, action: str) -> RequestBody:
        if len(data) > self.max_bytes:
            raise BadBody(413, f"the request body exceeds {self.max_bytes} bytes (--max-request-bytes)")
        text = inflate(data, encoding, self.max_bytes)
        if action == "score":
            _check_colons(text, self.limits, self.score_limits)
        try:
            document = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise BadBody(400, "invalid JSON: the body is not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise BadBody(400, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                                 f" (character {exc.pos})") from None
        except RecursionError:
            raise BadBody(400, "invalid JSON: nested too deeply") from None
        _check_list_lengths(document, self.limits, self.score_limits)
        problems = {}  # one problem per field: the first (a wrong type before a wrong value)
        for error in self._validators[action].iter_errors(document):
            if _checked_later(error):
                continue
            key = tuple(map(str, error.absolute_path))
            if key not in problems or error.validator == "type":
                problems[key] = _problem(error, self.limits)
        if problems:
            raise InvalidRequest.of(*(problems[key] for key in sorted(problems, key=lambda k: [(len(p), p) for p in k])))
        params = document.get("params") or {}
        return RequestBody(
            sequences=[item["sequence"] for item in document["items"]],
            include=list(params.get("include", [])),
            repr_layers=list(params.get("repr_layers", [])),
            variants=[list(item.get("variants", [])) for item in document["items"]],
            method=params.get("method", ""),
            window=pb.Window(**params["window"]) if "window" in params else None,
        )


# ---- error bodies ---------------------------------------------------------------------
MAX_DETAIL_CHARS = 2048
MAX_ERRORS = 16
# `errors` lists the problems of the body's own fields; those of the body as a whole (`body`) or
# of the model named in the URL path (`model`) are told in `detail` only.
_LISTED_FIELDS = ("items", "params")


def _listed(problem: Problem) -> bool:
    return problem.field.partition(".")[0].partition("[")[0] in _LISTED_FIELDS


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(ELLIPSIS)] + ELLIPSIS


def error_body(http_status: int, code: str, message: str, problems: tuple[Problem, ...] = (),
               request_id: str | None = None) -> bytes:
    """BioLM's error shape: `detail`, `errors` (per item and field), `status_code`, `code`;
    `message` repeats `detail` for callers of the earlier google.rpc.Status shape; `request_id`
    (ours, beside BioLM's keys) names the request in the server's logs and traces.

    ASCII only, so that it can travel in gRPC metadata to the gateway.
    """
    message = _clip(message, MAX_DETAIL_CHARS)  # the body travels in gRPC trailers: keep it small
    listed = [p for p in problems if _listed(p)][:MAX_ERRORS]
    entries = [{"index": p.index, "field": _clip(p.field, 64), "detail": _clip(p.message, MAX_DETAIL_CHARS // 4)}
               for p in listed]
    body = {"detail": message, "errors": entries, "status_code": http_status, "code": code, "message": message}
    if request_id is not None:
        body["request_id"] = request_id
    return json.dumps(body, ensure_ascii=True).encode()


# The gateway's Lua filter answers with this status and body instead of the transcoder's
# google.rpc.Status JSON (gateway/envoy_config.py); gRPC callers see the usual status.
HTTP_STATUS_METADATA = "x-esm-http-status"
ERROR_BODY_METADATA = "x-esm-error"


Trailers = tuple[tuple[str, str], ...]


def failure(exc: Exception, method: str, gateway: bool,
            request_id: str | None = None) -> tuple[grpc.StatusCode, str, Trailers]:
    """(code, message, trailing metadata) that an RPC aborts with when `exc` ends it: the status
    service.errors maps it to, the request id (x-request-id), and for the JSON gateway's methods
    also the HTTP status and BioLM's error body, whose `errors` list is the error's problems as
    they were found."""
    code, message, trailers = errors.status(exc, method)
    if request_id is not None:
        trailers += ((REQUEST_ID_HEADER, request_id),)
    if gateway:
        http_status = errors.http_status(exc, code)
        problems = exc.problems if isinstance(exc, errors.ServiceError) else ()
        trailers += (
            (HTTP_STATUS_METADATA, str(http_status)),
            (ERROR_BODY_METADATA, error_body(http_status, code.name, message, problems, request_id).decode()),
        )
    return code, message, trailers
