"""Scores from logits: BioLM's `log_prob`, and our Score methods (masked marginals, wild-type
marginals, pseudo-log-likelihoods).

A request becomes a `ScorePlan`: the distinct forward passes it needs (token tuples, at most
one `<mask>` each), every one asking for LOGITS only, so that they batch with any other
request's work, merge with equal passes in flight and hit the result cache (the wild type of
a deep mutational scan is computed once). Scores are read from the passes' logits, which
cover the 20 standard amino acids in the model alphabet's order (ServedModel.vocabulary):
log-softmax over those 20, in float64, from the float32 logits.

- log_prob: one unmasked pass; the sum over positions holding a standard amino acid of the
  log-probability of the residue present (BioLM's definition).
- masked_marginal (Meier et al. 2021): mask each mutated position alone in the wild type;
  a mutation scores log p(mt) - log p(wt) there; a multi-mutant the sum over its mutations
  (what `esm2 score` computed client-side before).
- wt_marginal: the same log-ratios from one unmasked pass of the wild type.
- pll: PLL(x) = sum over standard positions i of log p(x_i | x with i masked), for the wild
  type and each mutant; a variant scores PLL(mutant) - PLL(wild type).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from esm2_wire.variants import Mutation, Variant, mutations_in, oversized, parse_variant
from esm2_wire.vocabulary import MASK, STANDARD_AMINO_ACIDS, Limits
from service.errors import InvalidRequest, Problem, echo
from service.api.validation import parse_items

METHODS = ("masked_marginal", "wt_marginal", "pll")
DEFAULT_METHOD = "masked_marginal"
DEFAULT_MAX_MUTATIONS = 10_000
DEFAULT_MAX_PASSES = 2048

Tokens = tuple[str, ...]


@dataclass(frozen=True)
class ScoreLimits:
    """Bounds of one Score request beyond the item and length limits."""

    max_mutations: int = DEFAULT_MAX_MUTATIONS  # every mutation of every variant of every item
    max_passes: int = DEFAULT_MAX_PASSES  # forward passes, counted as `passes_needed` says


@dataclass(frozen=True)
class ScoreItem:
    """One validated wild type and its variants."""

    tokens: Tokens
    variants: tuple[Variant, ...]

    def mutant(self, variant: Variant) -> Tokens:
        letters = list(self.tokens)
        for m in variant:
            letters[m.position - 1] = m.mutant
        return tuple(letters)


def masked(tokens: Tokens, position: int) -> Tokens:
    """`tokens` with the 1-based `position` masked."""
    return tokens[: position - 1] + (MASK,) + tokens[position:]


def scored_positions(tokens: Tokens) -> list[int]:
    """1-based positions holding one of the 20 standard amino acids."""
    return [i for i, token in enumerate(tokens, start=1) if token in STANDARD_AMINO_ACIDS]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis (the 20 standard amino acids)."""
    shifted = logits.astype(np.float64)
    shifted -= shifted.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sequence_log_prob(tokens: Tokens, logits: np.ndarray, columns: dict[str, int]) -> float:
    """BioLM's log_prob of `tokens` from its unmasked logits [L, 20]."""
    positions = scored_positions(tokens)
    if not positions:
        return 0.0
    rows = np.array(positions) - 1
    picked = log_softmax(logits[rows])[np.arange(len(rows)), [columns[tokens[p - 1]] for p in positions]]
    return float(picked.sum())


# ---- requests ----------------------------------------------------------------------------------
def parse_method(method: str) -> str:
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise InvalidRequest.of(Problem("params.method", None,
                                        f"unknown value {echo(method)}; allowed: {', '.join(METHODS)}"))
    return method


def check_variant_bounds(variants: list[list], score_limits: ScoreLimits) -> None:
    """The request's mutations counted (`:`-separated) and each variant's length checked against
    its count, before any variant is parsed: a 3.7 MB body of long variants is refused after a
    str.count over it, not after parsing 573,440 mutations. Entries that are not text count as
    one mutation each; their type is the validator's to name."""
    given = sum(map(len, variants))
    if given > score_limits.max_mutations:  # each variant holds at least one mutation: refuse before counting
        raise _too_many_mutations(given, score_limits)
    mutations, problems = 0, []
    for index, texts in enumerate(variants):
        for number, text in enumerate(texts):
            if not isinstance(text, str):
                mutations += 1
                continue
            mutations += mutations_in(text)
            if (why := oversized(text)) is not None:
                problems.append(Problem(f"items[{index}].variants[{number}]", index, why))
    if mutations > score_limits.max_mutations:
        raise _too_many_mutations(mutations, score_limits)
    if problems:
        raise InvalidRequest.of(*problems)


def parse_score_items(sequences: list[str], variants: list[list[str]], limits: Limits,
                      score_limits: ScoreLimits) -> list[ScoreItem]:
    """Wild types checked as encode checks sequences, then every variant against its wild type,
    once the request's variants are within their bounds (check_variant_bounds)."""
    check_variant_bounds(variants, score_limits)
    parsed = parse_items(sequences, predict=False, limits=limits)
    items, problems = [], []
    for index, (item, texts) in enumerate(zip(parsed, variants)):
        wild_type = "".join(item.tokens)
        read: list[Variant] = []
        for number, text in enumerate(texts):
            try:
                read.append(parse_variant(text, wild_type))
            except ValueError as exc:
                problems.append(Problem(f"items[{index}].variants[{number}]", index, str(exc)))
        items.append(ScoreItem(item.tokens, tuple(read)))
    if problems:
        raise InvalidRequest.of(*problems)
    return items


def _too_many_mutations(count: int, score_limits: ScoreLimits) -> InvalidRequest:
    return InvalidRequest.of(Problem(
        "items", None, f"{count} mutations in one request; at most {score_limits.max_mutations} are allowed "
                       "(--max-score-mutations): split the variants over several requests"))


def passes_needed(method: str, items: list[ScoreItem]) -> int:
    """Forward passes a request costs, before equal passes merge: masked_marginal one per distinct
    mutated position, wt_marginal one per item, pll one per scored position of the wild type and
    of each variant."""
    if method == "wt_marginal":
        return len(items)
    if method == "masked_marginal":
        return sum(len({m.position for v in item.variants for m in v}) for item in items)
    return sum(len(scored_positions(item.tokens)) * (1 + len(item.variants)) for item in items)


# ---- plans ----------------------------------------------------------------------------------------
@dataclass
class ScorePlan:
    """The distinct passes of a request, in first-use order, and how to read scores from them."""

    method: str
    items: list[ScoreItem]
    passes: list[Tokens] = field(default_factory=list)
    _index: dict[Tokens, int] = field(default_factory=dict)

    def need(self, tokens: Tokens) -> int:
        """The pass computing `tokens`, added once however often it is needed."""
        found = self._index.get(tokens)
        if found is None:
            found = self._index[tokens] = len(self.passes)
            self.passes.append(tokens)
        return found

    @classmethod
    def of(cls, method: str, items: list[ScoreItem]) -> ScorePlan:
        plan = cls(method, items)
        for item in items:
            if method == "wt_marginal":
                plan.need(item.tokens)
            elif method == "masked_marginal":
                for position in sorted({m.position for v in item.variants for m in v}):
                    plan.need(masked(item.tokens, position))
            else:
                for tokens in (item.tokens, *map(item.mutant, item.variants)):
                    for position in scored_positions(tokens):
                        plan.need(masked(tokens, position))
        return plan


@dataclass(frozen=True)
class ItemScores:
    """Scores of one item: one per variant; for pll also the pseudo-log-likelihoods."""

    scores: list[float]
    pseudo_log_likelihood: float | None = None
    scored_positions: int | None = None
    variant_pseudo_log_likelihoods: list[float] = field(default_factory=list)


class PassRows:
    """Log-softmax rows read from finished passes, kept per (pass, position) only: a pass's
    full logits [L, 20] are dropped as soon as the rows the plan needs are read."""

    def __init__(self, plan: ScorePlan):
        self.plan = plan
        self.rows: dict[tuple[int, int], np.ndarray] = {}

    def wanted(self, pass_index: int) -> list[int]:
        """1-based positions of pass `pass_index` that scores read: every position of an unmasked
        pass (wt_marginal), else its masked one."""
        tokens = self.plan.passes[pass_index]
        if MASK in tokens:
            return [tokens.index(MASK) + 1]
        return list(range(1, len(tokens) + 1))

    def add(self, pass_index: int, logits: np.ndarray) -> None:
        positions = self.wanted(pass_index)
        table = log_softmax(logits[np.array(positions) - 1])
        for row, position in zip(table, positions):
            self.rows[pass_index, position] = row

    def row(self, tokens: Tokens, position: int) -> np.ndarray:
        return self.rows[self.plan._index[tokens], position]

    def pass_indexes(self, tokens: Tokens) -> list[int]:
        """The passes the rows of `tokens` are read from: its own."""
        return [self.plan._index[tokens]]


def pseudo_log_likelihood(rows: PassRows, columns: dict[str, int], tokens: Tokens) -> float:
    """PLL of `tokens`: at each standard position, masked alone, the log-probability of its residue."""
    return float(sum(rows.row(masked(tokens, p), p)[columns[tokens[p - 1]]] for p in scored_positions(tokens)))


def variant_score(rows: PassRows, columns: dict[str, int], item: ScoreItem, variant: Variant,
                  wild_pll: float | None = None) -> tuple[float, float | None]:
    """One variant's score, and for pll its pseudo-log-likelihood (`wild_pll`: the wild type's).
    Score and ScoreStream both read scores here, so that they are equal to the last bit."""
    plan = rows.plan
    if plan.method == "pll":
        mutant = pseudo_log_likelihood(rows, columns, item.mutant(variant))
        return mutant - wild_pll, mutant

    def ratio(m: Mutation) -> float:
        if plan.method == "wt_marginal":
            lp = rows.row(item.tokens, m.position)
        else:
            lp = rows.row(masked(item.tokens, m.position), m.position)
        return float(lp[columns[m.mutant]] - lp[columns[m.wild_type]])
    return float(sum(ratio(m) for m in variant)), None


def item_scores(rows: PassRows, columns: dict[str, int]) -> list[ItemScores]:
    out = []
    for item in rows.plan.items:
        if rows.plan.method == "pll":
            wild = pseudo_log_likelihood(rows, columns, item.tokens)
            scored = [variant_score(rows, columns, item, v, wild) for v in item.variants]
            out.append(ItemScores([score for score, _ in scored], wild, len(scored_positions(item.tokens)),
                                  [pll for _, pll in scored]))
        else:
            out.append(ItemScores([variant_score(rows, columns, item, v)[0] for v in item.variants]))
    return out


# ---- streamed scores ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoredBlock:
    """The variants of one item that a block of passes completed (ScoreStreamResponse)."""

    sequence_index: int
    variant_indexes: list[int]
    scores: list[float]
    variant_pseudo_log_likelihoods: list[float] = field(default_factory=list)
    pseudo_log_likelihood: float | None = None  # pll: in the item's first block
    scored_positions: int | None = None


class StreamedScores:
    """Which variants the passes finished so far complete: passes are awaited in plan order, so a
    variant is complete once the last pass it reads (in ScorePlan order) is done."""

    def __init__(self, rows: PassRows):
        self.plan = plan = rows.plan
        self.rows = rows
        # (last pass read, item index, variant index) in request order; pll also reads the wild type's
        # passes, and an item without variants still sends its wild type's PLL once its passes are done.
        self._pending: list[tuple[int, int, int | None]] = []
        for index, item in enumerate(plan.items):
            wild = self._last(self._wild_passes(item))
            if plan.method == "pll" and not item.variants:
                self._pending.append((wild, index, None))
            for number, variant in enumerate(item.variants):
                self._pending.append((max(wild, self._last(self._variant_passes(item, variant))), index, number))
        self._wild: dict[int, float] = {}

    def _last(self, passes: list[Tokens]) -> int:
        return max((index for tokens in passes for index in self.rows.pass_indexes(tokens)), default=-1)

    def _wild_passes(self, item: ScoreItem) -> list[Tokens]:
        return [masked(item.tokens, p) for p in scored_positions(item.tokens)] if self.plan.method == "pll" else []

    def _variant_passes(self, item: ScoreItem, variant: Variant) -> list[Tokens]:
        if self.plan.method == "wt_marginal":
            return [item.tokens]
        if self.plan.method == "masked_marginal":
            return [masked(item.tokens, m.position) for m in variant]
        mutant = item.mutant(variant)
        return [masked(mutant, p) for p in scored_positions(mutant)]

    def completed(self, passes_done: int, columns: dict[str, int]) -> list[ScoredBlock]:
        """The variants not sent yet whose passes are all among the first `passes_done`, in request
        order, grouped by item; they are then sent."""
        ready = [entry for entry in self._pending if entry[0] < passes_done]
        self._pending = [entry for entry in self._pending if entry[0] >= passes_done]
        blocks: list[ScoredBlock] = []
        for _, index, number in ready:
            item = self.plan.items[index]
            first = not blocks or blocks[-1].sequence_index != index
            if first:
                pll = positions = None
                if self.plan.method == "pll" and index not in self._wild:
                    pll = self._wild[index] = pseudo_log_likelihood(self.rows, columns, item.tokens)
                    positions = len(scored_positions(item.tokens))
                blocks.append(ScoredBlock(index, [], [], [], pll, positions))
            if number is None:
                continue
            score, pll = variant_score(self.rows, columns, item, item.variants[number], self._wild.get(index))
            blocks[-1].variant_indexes.append(number)
            blocks[-1].scores.append(score)
            if pll is not None:
                blocks[-1].variant_pseudo_log_likelihoods.append(pll)
        return blocks
