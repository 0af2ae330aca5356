"""Fixed-seed synthetic protein workloads (throughput does not depend on the residues' meaning)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# UniProtKB/Swiss-Prot amino-acid composition (%), the background frequencies of real proteins.
BACKGROUND = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07, "H": 2.27, "I": 5.96,
    "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56, "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}
FIXED_LENGTHS = (300,) * 8 + (1000, 2048)  # the fixed cases: 8x300, 1x1000, 1x2048


@dataclass(frozen=True)
class Workload:
    name: str
    sequences: tuple[str, ...]

    @property
    def residues(self) -> int:
        return sum(map(len, self.sequences))

    def limited(self, max_length: int, name: str | None = None) -> "Workload":
        return Workload(name or f"{self.name}, <= {max_length} residues",
                        tuple(s for s in self.sequences if len(s) <= max_length))

    def describe(self) -> str:
        lengths = sorted(map(len, self.sequences))
        return (f"{self.name}: {len(lengths)} sequences, {self.residues} residues, "
                f"lengths {lengths[0]}-{lengths[-1]} (median {lengths[len(lengths) // 2]})")


def random_sequences(lengths, rng: np.random.Generator) -> list[str]:
    letters = np.array(list(BACKGROUND))
    p = np.array(list(BACKGROUND.values()))
    return ["".join(rng.choice(letters, size=int(n), p=p / p.sum())) for n in lengths]


def lognormal_lengths(count: int, rng: np.random.Generator, median: float = 300, sigma: float = 0.6,
                      lo: int = 30, hi: int = 2048) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, size=count)), lo, hi).astype(int)


def mixed_workload(lognormal: int, seed: int = 0, fixed: tuple[int, ...] = FIXED_LENGTHS) -> Workload:
    """`lognormal` sequences with log-normal lengths around 300 (clipped 30-2048), plus the fixed
    lengths, in a fixed shuffled order (requests see a realistic mix, not sorted lengths)."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([lognormal_lengths(lognormal, rng), np.asarray(fixed, dtype=int)])
    rng.shuffle(lengths)
    return Workload(f"log-normal mix ({lognormal}) + fixed {len(fixed)}", tuple(random_sequences(lengths, rng)))


def single(length: int, seed: int = 1) -> str:
    return random_sequences([length], np.random.default_rng(seed))[0]


def write_fasta(workload: Workload, path) -> None:
    with open(path, "w") as out:
        for i, seq in enumerate(workload.sequences):
            out.write(f">seq{i}\n{seq}\n")
