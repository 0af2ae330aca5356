"""Benchmark harness: the ESM-2 service against stock fair-esm, measured in one run.

    python -m bench.run            # full run, figures for BENCHMARKS.md
    python -m bench.run --quick    # tiny model, a few sequences (the CI smoke)
"""
