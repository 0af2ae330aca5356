"""Scheduler cases: a small request's latency beside a huge one (head-of-line blocking), and
repeated work answered by the result cache. Each case starts its own servers, so that the
policies it compares run in the same conditions, one after the other."""

from __future__ import annotations

import threading
import time

import numpy as np

from bench.cases import Measurement
from bench.clients import drive, encode_requests
from bench.servers import Server
from bench.workload import Workload, random_sequences, single
from esm2_wire.proto import pb, pb_grpc

HEAD_OF_LINE = "head-of-line: small request latency beside a huge one"
REPEATS = "repeats: result cache"
EVERY_OUTPUT = ("mean", "per_token", "bos", "logits", "contacts", "attentions")
# The previous scheduler: first come, first served, a whole request in one batch, nothing interleaved.
FIFO_FLAGS = ("--aging", "0", "--max-batch-token-pairs", str(1 << 40))
MAX_SMALL_REQUESTS = 500  # bound on small requests sent beside one huge request


def _quantiles(latencies: list[float]) -> dict:
    values = np.asarray(latencies) * 1e3
    return {"n": len(values), "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
            "max_ms": float(values.max())}


def _wait_busy(server: Server, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while server.metric("esm_worker_busy") < 1:
        if time.monotonic() > end:
            raise RuntimeError("the huge request never reached the worker")
        time.sleep(0.01)


def head_of_line(name: str, checkpoint, device: str, server_args=(), huge_length: int = 2048,
                 small_length: int = 100, alone_requests: int = 30) -> Measurement:
    """One client sends 1-item small requests one after another: alone, then while one huge
    request (3 x huge_length residues, every output) runs; the default scheduler and the
    previous one (first come, first served) each on their own server."""
    huge = pb.EncodeRequest(model=name, params=pb.EncodeParams(include=list(EVERY_OUTPUT)),
                            items=[pb.SequenceItem(sequence=s)
                                   for s in random_sequences([huge_length] * 3, np.random.default_rng(5))])
    m = Measurement(name, HEAD_OF_LINE, extra={"huge": f"3 x {huge_length} residues, every output",
                                               "small": f"1 x {small_length} residues, mean"})
    seed = iter(range(10_000, 20_000))  # every small request distinct: nothing comes from the cache
    for policy, flags in (("default", ()), ("first come, first served (before)", FIFO_FLAGS)):
        with Server(name, checkpoint, "--max-sequence-length", "2048", "--device", device, "--cache-mb", "0",
                    *server_args, *flags) as server:
            smalls = [single(small_length, seed=next(seed)) for _ in range(alone_requests)]
            drive(server, encode_requests(name, smalls[:3], 1), 1)  # warm
            alone = drive(server, encode_requests(name, smalls[3:], 1), 1).latencies
            beside: list[float] = []
            huge_seconds: list[float] = []
            with server.channel() as channel:
                stub = pb_grpc.Esm2ServiceStub(channel)

                def send_huge():
                    start = time.perf_counter()
                    stub.Encode(huge, timeout=3600)
                    huge_seconds.append(time.perf_counter() - start)

                thread = threading.Thread(target=send_huge, daemon=True)
                thread.start()
                _wait_busy(server)
                while thread.is_alive() and len(beside) < MAX_SMALL_REQUESTS:
                    request = encode_requests(name, [single(small_length, seed=next(seed))], 1)[0]
                    start = time.perf_counter()
                    stub.Encode(request, timeout=3600)
                    beside.append(time.perf_counter() - start)
                thread.join(3600)
            m.extra[policy] = {"alone": _quantiles(alone), "beside_huge": _quantiles(beside),
                               "huge_request_s": huge_seconds[0] if huge_seconds else None,
                               "server_flags": " ".join(flags) or "(defaults)"}
    return m


def _dms(length: int, variants: int) -> tuple[str, list[str]]:
    """A wild type and `variants` distinct single-residue substitutions of it."""
    rng = np.random.default_rng(9)
    wild = single(length, seed=9)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    out: set[str] = set()
    while len(out) < variants:
        position = int(rng.integers(length))
        letter = letters[int(rng.integers(20))]
        if letter != wild[position]:
            out.add(wild[:position] + letter + wild[position + 1 :])
    return wild, sorted(out)


def repeats(name: str, checkpoint, device: str, workload: Workload, server_args=(), clients: int = 8,
            items: int = 8, probe_length: int = 300, probes: int = 20, dms_variants: int = 63) -> Measurement:
    """The same FASTA embedded twice; a deep mutational scan sending [wild type, variant] pairs;
    cache on (default) vs off, each on its own server. And one client's latency for a
    `probe_length`-residue item: computed (miss) vs answered from the cache (hit)."""
    m = Measurement(name, REPEATS)
    wild, variants = _dms(probe_length, dms_variants)
    dms = [pb.EncodeRequest(model=name, params=pb.EncodeParams(include=["mean"]),
                            items=[pb.SequenceItem(sequence=wild), pb.SequenceItem(sequence=v)]) for v in variants]
    fasta = encode_requests(name, workload.sequences, items)
    results = {}
    for cache in ("on", "off"):
        flags = () if cache == "on" else ("--cache-mb", "0")
        with Server(name, checkpoint, "--max-sequence-length", "2048", "--device", device,
                    *server_args, *flags) as server:
            drive(server, encode_requests(name, [single(50, seed=3)], 1), 1)  # warm
            first = drive(server, fasta, clients).seconds
            second = drive(server, fasta, clients).seconds
            scan = drive(server, dms, clients).seconds
            results[cache] = {"fasta_first_s": first, "fasta_second_s": second, "fasta_twice_s": first + second,
                              "dms_s": scan}
            if cache == "on":
                probe = [single(probe_length, seed=100 + i) for i in range(probes)]
                miss = drive(server, encode_requests(name, probe, 1), 1).latencies
                hit = drive(server, encode_requests(name, probe, 1), 1).latencies
                results["latency"] = {"miss": _quantiles(miss), "hit": _quantiles(hit),
                                      "miss_over_hit_p50": float(np.median(miss) / np.median(hit))}
                results["cache"] = {"hits": server.metric("esm_cache_hits_total"),
                                    "misses": server.metric("esm_cache_misses_total"),
                                    "merged": server.metric("esm_cache_merged_total"),
                                    "bytes": server.metric("esm_cache_bytes")}
    on, off = results["on"], results["off"]
    m.extra = {**results, "workload": workload.describe(), "clients": clients, "items_per_request": items,
               "dms": f"{dms_variants} requests of [wild type, variant], {probe_length} residues, mean",
               "fasta_twice_gain": off["fasta_twice_s"] / on["fasta_twice_s"], "dms_gain": off["dms_s"] / on["dms_s"]}
    return m


def markdown(measurements: list[Measurement]) -> list[str]:
    lines = []
    hol = [m for m in measurements if m.case == HEAD_OF_LINE and not m.skipped]
    if hol:
        lines += ["", "Head-of-line blocking: one client sends small requests one after another, alone and while a "
                  "huge request runs (small requests all distinct, cache off). Latency of the small requests, ms:", "",
                  "| model | scheduler | huge | alone p50 | alone p99 | beside huge p50 | beside huge p99 | beside huge max "
                  "| small requests beside | huge request s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in hol:
            for policy in ("default", "first come, first served (before)"):
                e = m.extra[policy]
                a, b = e["alone"], e["beside_huge"]
                lines.append(f"| {m.model} | {policy} | {m.extra['huge']} | {a['p50_ms']:.0f} | {a['p99_ms']:.0f} "
                             f"| {b['p50_ms']:.0f} | {b['p99_ms']:.0f} | {b['max_ms']:.0f} | {b['n']} "
                             f"| {e['huge_request_s']:.1f} |")
    rep = [m for m in measurements if m.case == REPEATS and not m.skipped]
    if rep:
        lines += ["", "Repeats: the result cache (default on) vs `--cache-mb 0`, each on its own server; seconds:", "",
                  "| model | FASTA twice, cache on (1st + 2nd) | cache off | gain | DMS, cache on | cache off | gain "
                  "| 1-item miss p50 ms | hit p50 ms | miss / hit |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in rep:
            e = m.extra
            on, off, lat = e["on"], e["off"], e["latency"]
            lines.append(f"| {m.model} | {on['fasta_twice_s']:.2f} ({on['fasta_first_s']:.2f} + "
                         f"{on['fasta_second_s']:.2f}) | {off['fasta_twice_s']:.2f} | {e['fasta_twice_gain']:.2f}x "
                         f"| {on['dms_s']:.2f} | {off['dms_s']:.2f} | {e['dms_gain']:.2f}x "
                         f"| {lat['miss']['p50_ms']:.1f} | {lat['hit']['p50_ms']:.2f} | {lat['miss_over_hit_p50']:.0f}x |")
        lines += ["", f"FASTA: {rep[0].extra['workload']}, {rep[0].extra['clients']} clients x "
                  f"{rep[0].extra['items_per_request']} items; DMS: {rep[0].extra['dms']}."]
    return lines
