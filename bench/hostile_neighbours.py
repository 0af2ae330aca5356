"""A small caller beside hostile Score requests (issue 32), through Envoy, this checkout and
optionally another.

    python -m bench.hostile_neighbours --base /tmp/base-checkout [--rounds 1]

Each checkout serves the random-weight 8M checkpoint with its own server and Envoy (bench.
stream_throughput.Checkout), one checkout at a time: the attack loads the whole machine. A small
caller sends log_prob of a new 22-residue sequence each call (no cache hit), first alone, then
while `--attackers` callers each send issue 32's body `--rounds` times, back to back: one
`score` with wt_marginal, a 2,048-residue wild type and 280 variants of 2,048 mutations each
(3.7 MB, 573,440 mutations; refused with a 400 as over --max-score-mutations). The report gives
the small caller's median and p95 latency alone and while the attack lasts, and the hostile
requests' answers. An attack that outlasts `--max-attack-s` is no longer waited for.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.stream_throughput import Checkout
from harness.server_process import REPO
from service.models.random_checkpoints import write_random_checkpoint

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def hostile_body() -> bytes:
    wild_type = (AMINO * 103)[:2048]
    variant = ":".join(f"{a}{p}{'A' if a != 'A' else 'C'}" for p, a in enumerate(wild_type, start=1))
    return json.dumps({"params": {"method": "wt_marginal"},
                       "items": [{"sequence": wild_type, "variants": [variant] * 280}]}).encode()


def p95(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.95 * len(values)))]


def measure(url: str, attackers: int, rounds: int, alone_calls: int, max_attack_s: float) -> dict:
    """The small caller's latencies (ms) alone and beside the attack; the hostile answers' (ms, status)."""
    rng = random.Random(7)
    session = requests.Session()

    def small() -> float:
        body = {"items": [{"sequence": "".join(rng.choice(AMINO) for _ in range(22))}]}
        started = time.perf_counter()
        response = session.post(url + "/api/v3/esm2-8m/log_prob/", json=body, timeout=600)
        response.raise_for_status()
        return (time.perf_counter() - started) * 1000

    deadline = time.monotonic() + 120  # Envoy listening, its health check passed
    while True:
        try:
            if session.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy")
        time.sleep(0.2)
    for _ in range(20):  # warm: connections, the model's first batches
        small()
    alone = [small() for _ in range(alone_calls)]
    body, answered = hostile_body(), []

    def attack() -> None:
        for _ in range(rounds):
            started = time.perf_counter()
            try:
                status = requests.post(url + "/api/v3/esm2-8m/score/", data=body, timeout=600,
                                       headers={"Content-Type": "application/json"}).status_code
            except requests.RequestException:  # the checkout stopped under a request still being read
                return
            answered.append(((time.perf_counter() - started) * 1000, status))

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(attackers)]
    for thread in threads:
        thread.start()
    beside, end = [], time.monotonic() + max_attack_s
    while any(thread.is_alive() for thread in threads) and time.monotonic() < end:
        beside.append(small())
    return {"alone": alone, "beside": beside, "answered": list(answered)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_neighbours", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="another checkout to measure too (protos generated)")
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="hostile requests each attacker sends, one after another")
    parser.add_argument("--max-attack-s", type=float, default=180, help="stop measuring an attack that lasts longer")
    parser.add_argument("--alone-calls", type=int, default=200)
    args = parser.parse_args(argv)
    repos = ([("base", args.base.resolve())] if args.base else []) + [("this", REPO)]
    print("| checkout | small caller alone: median / p95 ms | while the attack lasts: median / p95 ms (calls) | "
          "hostile requests answered: count, median / max ms, statuses |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="esm-hostile-bench-") as tmp:
        write_random_checkpoint("8m", Path(tmp), seed=2)
        for name, repo in repos:
            checkout = Checkout(name, repo, Path(tmp), Path(tmp))
            try:
                seen = measure(f"http://127.0.0.1:{checkout.http_port}", args.attackers, args.rounds, args.alone_calls,
                               args.max_attack_s)
            finally:
                checkout.stop()
            alone, beside, answered = seen["alone"], seen["beside"], seen["answered"]
            hostile = (f"{len(answered)}, {statistics.median(ms for ms, _ in answered):.0f} / "
                       f"{max(ms for ms, _ in answered):.0f}, {sorted({s for _, s in answered})}" if answered else "0")
            print(f"| {name} | {statistics.median(alone):.1f} / {p95(alone):.1f} | {statistics.median(beside):.1f} / "
                  f"{p95(beside):.1f} ({len(beside)}) | {hostile} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
