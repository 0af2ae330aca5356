"""Request validation and tokenization, before any model work.

fair-esm's tokenizer raises KeyError on unknown letters, silently drops whitespace and
accepts special tokens such as `<pad>` inside a sequence, so sequences are checked
here character by character and tokenized with the alphabet's index directly.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from esm2_wire import output_kinds
from esm2_wire.output_kinds import OutputKind
from esm2_wire.vocabulary import ENCODE_LETTERS, MASK, PREDICT_LETTERS, Limits, letter_problem
from esm2_wire.windows import resolved
from service.api.windows import Window
from service.errors import InvalidRequest, Problem, echo

# Longest params list: more layers than any ESM-2 has, every output several times over.
MAX_LIST_PARAM = 64  # values in params.include / params.repr_layers, gRPC and JSON alike

DEFAULT_INCLUDE = ("mean",)
DEFAULT_REPR_LAYERS = (-1,)
_MASK_SPLIT = re.compile(re.escape(MASK))

__all__ = ["EncodeOptions", "InvalidRequest", "Limits", "ParsedItem", "Problem", "parse_items", "parse_options",
           "parse_window"]


@dataclass(frozen=True)
class EncodeOptions:
    outputs: frozenset[OutputKind]
    layers: tuple[int, ...]  # non-negative, in request order, deduplicated


@dataclass(frozen=True)
class ParsedItem:
    tokens: tuple[str, ...]  # residues and `<mask>`, one per position (no BOS/EOS)


def parse_sequence(index: int, sequence: str, *, predict: bool, limits: Limits) -> ParsedItem | Problem:
    """Tokens of one sequence, or the problem with it (naming the item)."""
    problem = _tokens_or_problem(sequence, predict, limits)
    if isinstance(problem, str):
        return Problem(f"items[{index}].sequence", index, problem)
    return problem


def _tokens_or_problem(sequence: str, predict: bool, limits: Limits) -> ParsedItem | str:
    if not sequence:
        return "must not be empty"
    # Length first (str.count runs in C), so an oversized sequence costs no per-character scan.
    residues = len(sequence) - (len(MASK) - 1) * sequence.count(MASK) if predict else len(sequence)
    if residues > limits.max_sequence_length:
        return f"{residues} residues; at most {limits.max_sequence_length} are allowed"
    if predict:
        pieces = _MASK_SPLIT.split(sequence)
        allowed_text = "allowed: ACDEFGHIKLMNPQRSTVWY, BXZUO and <mask> ('-' is not allowed in predict)"
        offset = 0
        tokens: list[str] = []
        for number, piece in enumerate(pieces):
            error = letter_problem(piece, PREDICT_LETTERS, allowed_text, offset)
            if error:
                return error
            tokens.extend(piece)
            offset += len(piece)
            if number < len(pieces) - 1:
                tokens.append(MASK)
                offset += len(MASK)
        if len(pieces) == 1:
            return f"must contain at least one {MASK} token"
    else:
        if MASK in sequence:
            return f"{MASK} is only accepted by predict"
        error = letter_problem(sequence, ENCODE_LETTERS, "allowed: ACDEFGHIKLMNPQRSTVWY, BXZUO and '-'")
        if error:
            return error
        tokens = list(sequence)
    return ParsedItem(tuple(tokens))


def parse_items(sequences: list[str], *, predict: bool, limits: Limits) -> list[ParsedItem]:
    count = len(sequences)
    if not 1 <= count <= limits.max_items:
        raise InvalidRequest.of(Problem("items", None, f"expected 1 to {limits.max_items} items, got {count}"))
    parsed, problems = [], []
    for index, sequence in enumerate(sequences):
        result = parse_sequence(index, sequence, predict=predict, limits=limits)
        (problems.append if isinstance(result, Problem) else parsed.append)(result)
    if problems:
        raise InvalidRequest.of(*problems)
    return parsed


def check_list_lengths(lists: dict[str, list]) -> None:
    """The params lists' bound (the JSON schema's maxItems), checked before any entry is looked at,
    so that a request's cost does not grow with a list only the message size bounds."""
    problems = [
        Problem(f"params.{name}", None, f"at most {MAX_LIST_PARAM} values, got {len(values)}")
        for name, values in lists.items() if len(values) > MAX_LIST_PARAM
    ]
    if problems:
        raise InvalidRequest.of(*problems)


def parse_options(include: list[str], repr_layers: list[int], num_layers: int, model: str) -> EncodeOptions:
    """`model` is a served model's name (checked before), so it is safe to repeat."""
    check_list_lengths({"include": include, "repr_layers": repr_layers})
    problems = []
    chosen = set()
    for index, value in enumerate(include or DEFAULT_INCLUDE):
        kind = OutputKind.parse(value)
        if kind is not None:
            chosen.add(kind)
        else:
            problems.append(Problem(
                f"params.include[{index}]", None,
                f"unknown value {echo(value)}; allowed: " + ", ".join(output_kinds.NAMES)
                + " (per_residue is an alias of per_token)",
            ))
    layers: list[int] = []
    for index, layer in enumerate(repr_layers or DEFAULT_REPR_LAYERS):
        if -(num_layers + 1) <= layer <= num_layers:
            absolute = layer if layer >= 0 else num_layers + 1 + layer
            if absolute not in layers:
                layers.append(absolute)
        else:
            problems.append(Problem(
                f"params.repr_layers[{index}]", None,
                f"layer {layer} is out of range for {model} ({num_layers} layers); "
                f"allowed: {-(num_layers + 1)} to {num_layers}",
            ))
    if problems:
        raise InvalidRequest.of(*problems)
    return EncodeOptions(outputs=frozenset(chosen), layers=tuple(layers))


def parse_window(length: int, stride: int, limits: Limits, field: str = "params.window") -> Window:
    """A params.window (0: the default) on a server that offers windowed mode, else the problem."""
    problems = []
    if not limits.max_windowed_residues:
        problems.append(Problem(field, None, "windowed mode is off on this server (--max-windowed-residues is 0)"))
    length, stride = resolved(length, stride)
    if not 1 <= length <= limits.max_sequence_length:
        problems.append(Problem(f"{field}.length", None, f"{length} residues; allowed: 1 to "
                                f"{limits.max_sequence_length} (the longest ordinary item: each window is one)"))
    if not 1 <= stride <= length:
        problems.append(Problem(f"{field}.stride", None, f"{stride}; allowed: 1 to the window length ({length})"))
    if problems:
        raise InvalidRequest.of(*problems)
    return Window(length, stride)


def windowed_limits(limits: Limits) -> Limits:
    """The limits items of a windowed request are checked against: up to --max-windowed-residues."""
    return dataclasses.replace(limits, max_sequence_length=max(limits.max_sequence_length,
                                                               limits.max_windowed_residues))
