"""Scan every single substitution of a stretch of a protein; report the most and least tolerant positions.

    python examples/scan_protein.py --sequence MKTAYIAKQR... --positions 1-20 --method wt_marginal

The same as `esm2 score --sequence SEQ --scan --positions 1-20 -o scan.csv --png scan.png`. With real
weights a position whose substitutions all score far below 0 is conserved (often buried or
catalytic); one where many score near or above 0 tolerates change (often surface loops).
"""

from __future__ import annotations

import numpy as np
from common import arguments, connect

from esm2_client import scoring
from score_variants import WILD_TYPE


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--sequence", default=WILD_TYPE)
    parser.add_argument("--positions", default="1-20", help="FIRST-LAST, 1-based, inclusive")
    parser.add_argument("--method", default="wt_marginal", choices=scoring.METHODS)
    args = parser.parse_args()
    first, last = map(int, args.positions.split("-"))
    variants = scoring.scan_variants(args.sequence, first, last)
    with connect(args) as client:
        scores = scoring.variant_scores(client, args.model, args.sequence, variants, args.method)
    by_position: dict[int, list[float]] = {}
    for variant, score in zip(variants, scores):
        by_position.setdefault(int(variant[1:-1]), []).append(score)
    tolerance = {position: float(np.mean(values)) for position, values in by_position.items()}
    ranked = sorted(tolerance, key=tolerance.get)
    print(f"scanned {len(variants)} substitutions at {len(tolerance)} positions ({args.method})")
    for label, positions in (("least tolerant", ranked[:3]), ("most tolerant", ranked[-3:][::-1])):
        print(label + ": " + ", ".join(f"{args.sequence[p - 1]}{p} (mean {tolerance[p]:.2f})" for p in positions))


if __name__ == "__main__":
    main()
