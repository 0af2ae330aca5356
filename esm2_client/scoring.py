"""Zero-shot scores for `esm2 score`, computed by the server's Score RPC (docs/scoring.md).

- Masked marginal (Meier et al. 2021): mask position i alone and score a substitution
  as log p(mt | x with i masked) - log p(wt | x with i masked), the log-softmax taken over
  the 20 standard amino acids. A multi-mutant (`A23G:K45R`) scores the sum of its
  mutations' scores, each from its own single-position mask.
- Pseudo-log-likelihood: PLL = sum over positions i of log p(x_i | x with i masked);
  positions holding a non-standard letter (X, B, Z, U, O) are skipped. Perplexity =
  exp(-PLL / n) over the n scored positions.

The server queues every masked pass of a request at once, so they batch together, merge with
equal passes and come from its cache when repeated. This module only cuts the work into
requests within the model's bounds (ModelInfo: max_items, max_score_passes,
max_score_mutations) and keeps up to the client's max_in_flight of them running. A request of
STREAM_MIN_PASSES passes or more goes through ScoreStream: it may run longer than one call's
deadline allows (the server refuses such a unary call at once: docs/how-it-works.md, "Admission"),
and its progress is reported pass by pass to `bar` (a tqdm, or anything with `total` and `update`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from esm2_client.client import Esm2Client, WindowArg
from esm2_client.results import ScoreResult
from esm2_wire.variants import parse_variant
from esm2_wire.vocabulary import STANDARD_AMINO_ACIDS
from esm2_wire.windows import resolved, window_starts


@dataclass(frozen=True)
class PseudoLikelihood:
    pseudo_log_likelihood: float
    scored_positions: int
    perplexity: float


def _groups(costs: Sequence[tuple[frozenset, int]], max_keys: int, max_total: int) -> list[range]:
    """Consecutive runs of items within both bounds: distinct keys (the passes a run needs) and
    summed counts. An item over a bound alone still gets its own run: the server names the bound."""
    groups, start, keys, total = [], 0, set(), 0
    for index, (item_keys, count) in enumerate(costs):
        if index > start and (len(keys | item_keys) > max_keys or total + count > max_total):
            groups.append(range(start, index))
            start, keys, total = index, set(), 0
        keys |= item_keys
        total += count
    if start < len(costs):
        groups.append(range(start, len(costs)))
    return groups


def _bound(value: int) -> int:
    return value or sys.maxsize  # 0: a server that does not report the bound


def _run(client: Esm2Client, groups: list[int], request: Callable[[int], list]) -> Iterator[list]:
    """Each group's request (by its number), up to max_in_flight at once; results in group order."""
    with ThreadPoolExecutor(client.max_in_flight, thread_name_prefix="esm2-score") as pool:
        yield from pool.map(request, groups)


# Requests of at least this many forward passes go through ScoreStream (a few seconds of work and
# more on a CPU at the 8M shape): they report progress and are admitted by their work, not a deadline.
STREAM_MIN_PASSES = 32


def _score(client: Esm2Client, model: str, items, method: str, passes: int, bar,
           window: WindowArg = None) -> list[ScoreResult]:
    """One request of about `passes` passes: streamed when large, its progress added to `bar`."""
    if passes < STREAM_MIN_PASSES:
        results = client.score(model, items, method, window=window)
        if bar is not None:
            bar.update(passes)
        return results
    reported = 0

    def progress(done: int, total: int) -> None:
        nonlocal reported
        if bar is not None:  # the server's count merges equal passes: never past this request's share
            step = min(done, passes) - reported
            bar.update(step)
            reported += step
    results = client.score_stream(model, items, method, progress=progress, window=window)
    if bar is not None:
        bar.update(passes - reported)
    return results


def _expect(bar, passes: int) -> None:
    if bar is not None:
        bar.total = passes
        bar.refresh()


METHODS = ("masked_marginal", "wt_marginal", "pll")
MUTANTS = "".join(sorted(STANDARD_AMINO_ACIDS))  # a scan's mutants, in alphabetical order


def _starts(residues: int, window: WindowArg) -> tuple[list[int], int]:
    """The starts of a sequence's windows and their length; one window, the whole item, without one."""
    if window is None:
        return [0], residues
    length, stride = resolved(*((window, 0) if isinstance(window, int) else window))
    length = min(length, residues)
    return window_starts(residues, length, stride), length


def _covering(residues: int, window: WindowArg) -> Callable[[int], list[int]]:
    """The starts of the windows covering a 1-based position (one pass each)."""
    starts, length = _starts(residues, window)
    return lambda position: [s for s in starts if s < position <= s + length]


def _passes_of(sequence: str, window: WindowArg) -> int:
    """Masked passes of one sequence's PLL: one per scored position, per window covering it."""
    covering = _covering(len(sequence), window)
    return sum(len(covering(p)) for p, letter in enumerate(sequence, start=1) if letter in STANDARD_AMINO_ACIDS)


def _variant_costs(method: str, sequence: str, parsed: list, window: WindowArg = None) -> list[tuple[frozenset, int]]:
    """Per variant: the passes it needs (keys, shared where the server merges them) and its mutations;
    in windowed mode a position's pass is one per window covering it."""
    covering = _covering(len(sequence), window)
    if method == "masked_marginal":  # one pass per distinct mutated position
        return [(frozenset((m.position, s) for m in v for s in covering(m.position)), len(v)) for v in parsed]
    if method == "wt_marginal":  # one pass of the wild type (per window) for all of them
        return [(frozenset(_starts(len(sequence), window)[0]), len(v)) for v in parsed]
    # pll: the wild type's passes once per request, and each variant's own, one per scored position
    scored = _passes_of(sequence, window)
    wild_type = frozenset(range(scored))
    return [(wild_type | frozenset(range(scored * (i + 1), scored * (i + 2))), len(v)) for i, v in enumerate(parsed)]


def variant_scores(client: Esm2Client, model: str, sequence: str, variants: Sequence[str],
                   method: str = "masked_marginal", bar=None, window: WindowArg = None) -> list[float]:
    """One score per variant (`K2A`, `T3G:A4C`), in order, by `method`: masked_marginal and
    wt_marginal the sum of log p(mt) - log p(wt) over its mutations, pll PLL(variant) - PLL(wild
    type). Raises ValueError for a variant that does not fit `sequence`. `bar`: a progress bar
    counting passes."""
    info = client.model_info(model)
    parsed = [parse_variant(text, sequence) for text in variants]
    costs = _variant_costs(method, sequence, parsed, window)
    groups = _groups(costs, _bound(info.max_score_passes), _bound(info.max_score_mutations))
    passes = [len(frozenset().union(*(costs[i][0] for i in group))) for group in groups]
    _expect(bar, sum(passes))

    def request(number: int) -> list[float]:
        (result,) = _score(client, model, [(sequence, [variants[i] for i in groups[number]])], method,
                           passes[number], bar, window)
        return list(result.scores)
    return [score for scores in _run(client, list(range(len(groups))), request) for score in scores]


def masked_marginal_scores(client: Esm2Client, model: str, sequence: str, variants: Sequence[str],
                           window: WindowArg = None) -> list[float]:
    """variant_scores by masked marginals."""
    return variant_scores(client, model, sequence, variants, "masked_marginal", window=window)


def scan_variants(sequence: str, first: int, last: int) -> list[str]:
    """Every single substitution at positions first..last (1-based, inclusive), position by position,
    mutants in alphabetical order (MUTANTS); positions whose wild type is not a standard amino acid
    (X, B, Z, U, O) have none."""
    return [f"{wild_type}{position}{mutant}"
            for position, wild_type in enumerate(sequence[first - 1:last], start=first)
            if wild_type in STANDARD_AMINO_ACIDS
            for mutant in MUTANTS if mutant != wild_type]


def pseudo_log_likelihoods(client: Esm2Client, model: str, sequences: Sequence[str],
                           bar=None, window: WindowArg = None) -> Iterator[PseudoLikelihood]:
    """The PLL of each sequence, in order, as the requests finish. `bar`: a progress bar counting passes."""
    info = client.model_info(model)
    # Keys: the items themselves (at most max_items); counts: their passes, one per scored position.
    costs = [(frozenset([i]), _passes_of(s, window)) for i, s in enumerate(sequences)]
    groups = _groups(costs, _bound(info.max_items), _bound(info.max_score_passes))
    passes = [sum(costs[i][1] for i in group) for group in groups]
    _expect(bar, sum(passes))

    def request(number: int) -> list[PseudoLikelihood]:
        results = _score(client, model, [(sequences[i], []) for i in groups[number]], "pll", passes[number], bar,
                         window)
        return [_likelihood(r.pseudo_log_likelihood, r.scored_positions) for r in results]
    for likelihoods in _run(client, list(range(len(groups))), request):
        yield from likelihoods


def _likelihood(pll: float, scored: int) -> PseudoLikelihood:
    if not scored:
        return PseudoLikelihood(float("nan"), 0, float("nan"))
    return PseudoLikelihood(pll, scored, math.exp(-pll / scored))
