"""Real processes for the tests and the benchmarks, on 127.0.0.1 (not shipped in the package)."""
