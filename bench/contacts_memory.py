"""One contacts forward in a fresh process, for peak-memory comparisons (run by bench.cases).

    python -m bench.contacts_memory stock|ours CHECKPOINT LENGTH OUT.npy

Prints one JSON line: peak RSS of the whole process (ru_maxrss, loading included), RSS after
loading, peak RSS during the forward alone (VmHWM reset after loading), forward seconds.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import reset_peak_rss
from bench.workload import single
from esm2_wire.output_kinds import OutputKind
from service.models.checkpoints import load
from service.models.forward import BatchPlan, forward


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str]) -> int:
    impl, checkpoint, length, out = argv
    loaded = load("bench", Path(checkpoint))
    _, _, tokens = loaded.alphabet.get_batch_converter()([("x", single(int(length), seed=7))])
    after_load = status_mib("VmRSS")
    reset_peak_rss(os.getpid())  # loading holds the weights twice; measure the forward alone
    start = time.perf_counter()
    with torch.no_grad():
        if impl == "stock":
            contacts = loaded.model(tokens, repr_layers=[], return_contacts=True)["contacts"][0]
        else:
            contacts = forward(loaded.model, tokens, BatchPlan(outputs=frozenset({OutputKind.CONTACTS}))).contacts[0]
    seconds = time.perf_counter() - start
    np.save(out, contacts.numpy())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_rss_mib": peak, "after_load_mib": after_load, "forward_seconds": seconds,
                      "forward_peak_rss_mib": status_mib("VmHWM")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
