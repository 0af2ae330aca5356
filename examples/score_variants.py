"""Score a list of variants of one protein, best first.

    python examples/score_variants.py [VARIANTS.csv] --sequence MKTAYIAKQR... --method masked_marginal

With real weights a score is log p(mutant) - log p(wild type) at each mutated position (summed for
multi-mutants): near 0 the model finds the mutant as plausible as the wild type, strongly
negative scores flag likely damaging substitutions (Meier et al. 2021).
"""

from __future__ import annotations

import csv

from common import DATA, arguments, connect

from esm2_client import scoring

WILD_TYPE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="?", default=DATA / "variants.csv", help="CSV with a `mutant` column")
    parser.add_argument("--sequence", default=WILD_TYPE, help="the wild type")
    parser.add_argument("--method", default="masked_marginal", choices=scoring.METHODS)
    args = parser.parse_args()
    with open(args.variants, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with connect(args) as client:
        scores = scoring.variant_scores(client, args.model, args.sequence, [r["mutant"] for r in rows], args.method)
    for row, score in sorted(zip(rows, scores), key=lambda pair: -pair[1]):
        print(f"{score:10.4f}  {row['mutant']:10s} {row.get('name', '')}")


if __name__ == "__main__":
    main()
