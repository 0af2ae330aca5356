"""Every script of examples/ runs against a server like `make demo`'s (random weights at the 8M
shape), says that its numbers are meaningless there, and prints what it promises."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from support import REPO

from esm2_client import Esm2Client

EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))  # the scripts import their `common` module as run from there


def run_example(name: str, server, *args: str) -> list[str]:
    run = subprocess.run([sys.executable, str(EXAMPLES / name), "--server", server.target, "--model", "esm2-8m", *args],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "RANDOM WEIGHTS (make demo): the numbers below are meaningless" in run.stderr
    return run.stdout.splitlines()


def test_every_example_is_tested_here():
    tested = {"embed_and_cluster.py", "score_variants.py", "scan_protein.py", "contacts_vs_structure.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} - {"common.py"} == tested


def test_embed_and_cluster(server):
    lines = run_example("embed_and_cluster.py", server)
    clusters = dict(reversed(line.removeprefix("cluster ").split(": ")) for line in lines)
    assert sorted(clusters) == ["globin_a", "globin_b", "kinase_a", "kinase_b", "lysozyme"]
    # One residue apart: the same cluster whatever the weights.
    assert clusters["kinase_a"] == clusters["kinase_b"] and clusters["globin_a"] == clusters["globin_b"]


def test_score_variants_ranks_the_servers_scores(server):
    lines = run_example("score_variants.py", server)
    shown = {line.split()[1]: float(line.split()[0]) for line in lines}
    with open(EXAMPLES / "data" / "variants.csv", newline="") as handle:
        variants = [row["mutant"] for row in csv.DictReader(handle)]
    assert sorted(shown) == sorted(variants)
    assert list(shown.values()) == sorted(shown.values(), reverse=True)
    from score_variants import WILD_TYPE
    with Esm2Client(server.target) as client:
        for variant in variants:
            (alone,) = client.score("esm2-8m", [(WILD_TYPE, [variant])])
            assert shown[variant] == pytest.approx(alone.scores[0], abs=5e-5)


def test_scan_protein(server):
    lines = run_example("scan_protein.py", server, "--positions", "1-6")
    assert lines[0] == "scanned 114 substitutions at 6 positions (wt_marginal)"
    assert lines[1].startswith("least tolerant: ") and lines[2].startswith("most tolerant: ")


def test_contacts_vs_structure(server):
    lines = run_example("contacts_vs_structure.py", server)
    assert lines[0] == "32 residues, 18 contacts at |i-j| >= 6"
    assert lines[1].startswith("precision of the top L/5 predicted contacts: ") and "(chance: 0.05)" in lines[1]

