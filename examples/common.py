"""What every example shares: where the server is, and a note when its weights are random."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esm2_client import Esm2Client

DATA = Path(__file__).resolve().parent / "data"


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--server", default="localhost:50051", help="gRPC address (make demo / make serve: :50051)")
    parser.add_argument("--model", default="esm2-8m")
    return parser


def connect(args) -> Esm2Client:
    """A client, and a warning on stderr when the model's weights are random (make demo)."""
    client = Esm2Client(args.server)
    provenance = client.provenance(args.model)
    print(f"# {provenance.model}, weights {provenance.weights_fingerprint[:19]}..., {provenance.precision}", file=sys.stderr)
    if provenance.random_weights:
        print("# RANDOM WEIGHTS (make demo): the numbers below are meaningless; they only show the shape of the "
              "answer. Serve the real checkpoint (make serve) for results.", file=sys.stderr)
    return client
