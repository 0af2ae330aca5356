"""Embed a FASTA file and cluster the proteins by their mean embeddings.

    python examples/embed_and_cluster.py [FASTA] --server localhost:50051 --model esm2-8m

With real weights, proteins of one family (here the two kinase and the two globin fragments) sit
close together: cosine similarity near 1 within a family, lower across, so they share a cluster.
"""

from __future__ import annotations

import numpy as np
from Bio import SeqIO
from common import DATA, arguments, connect


def clusters(vectors: np.ndarray, threshold: float) -> list[int]:
    """Single-linkage clusters: proteins whose cosine similarity is over `threshold` are joined."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similar = unit @ unit.T > threshold
    labels = list(range(len(vectors)))
    for i, j in zip(*np.nonzero(similar)):
        old, new = labels[j], labels[i]
        labels = [new if label == old else label for label in labels]
    names = {label: n for n, label in enumerate(dict.fromkeys(labels))}
    return [names[label] for label in labels]


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("fasta", nargs="?", default=DATA / "proteins.fasta")
    parser.add_argument("--threshold", type=float, default=0.99, help="cosine similarity that joins two proteins")
    args = parser.parse_args()
    records = list(SeqIO.parse(str(args.fasta), "fasta"))
    with connect(args) as client:
        outputs = client.encode(args.model, [str(r.seq) for r in records], include=["mean"])
    vectors = np.stack([out.mean[max(out.mean)] for out in outputs])  # the last layer
    for record, label in zip(records, clusters(vectors, args.threshold)):
        print(f"cluster {label}: {record.id}")


if __name__ == "__main__":
    main()
