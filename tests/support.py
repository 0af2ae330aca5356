"""Helpers the tests import: the one way to start a server or a gateway, one `wait_for`,
request builders. Test modules import this (and reference.py), never one another."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import requests

from esm2_wire.proto import pb, pb_grpc
from gateway.envoy_config import GatewayConfig
from gateway.launch import EnvoyProcess
from harness import server_process
from harness.server_process import REPO, free_port

__all__ = ["ESM2_COMMAND", "PROVENANCE", "REPO", "ServerProcess", "body", "browser_wait", "chromium", "encode_request",
           "envoy_admin_get", "esm2", "free_port", "needs_browser", "post", "start_gateway", "start_server", "wait_for",
           "write_fasta"]


class ServerProcess(server_process.ServerProcess):
    """A real server subprocess, plus a gRPC channel to it once ready."""

    channel = None

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        super().wait_ready(timeout)
        self.channel = grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", 1 << 30)])
        return self

    @property
    def stub(self) -> pb_grpc.Esm2ServiceStub:
        return pb_grpc.Esm2ServiceStub(self.channel)

    def stop(self, timeout: float = 60) -> int:
        if self.channel is not None:
            self.channel.close()
        return super().stop(timeout)


def encode_request(model: str, sequences, include=(), repr_layers=()) -> pb.EncodeRequest:
    return pb.EncodeRequest(
        model=model,
        params=pb.EncodeParams(include=list(include), repr_layers=list(repr_layers)),
        items=[pb.SequenceItem(sequence=s) for s in sequences],
    )


def start_server(log_dir: Path, *args: str, models: dict[str, Path | None] | None = None, model_dir: Path | None = None,
                 env: dict | None = None, port: int | None = None, metrics_port: int | None = None,
                 ready: bool = True) -> ServerProcess:
    """A server serving `models` (name -> checkpoint file, or None: found in `model_dir`), plus
    `args` (e.g. a --models-file instead); ready unless `ready=False`. Use it as a context manager,
    or let `server_factory` stop it."""
    command = ["--models", ",".join(models)] if models else []
    command += [f for name, path in (models or {}).items() if path is not None for f in ("--checkpoint", f"{name}={path}")]
    if model_dir is not None:
        command += ["--model-dir", str(model_dir)]
    proc = ServerProcess(log_dir, *command, *args, env=env, port=port, metrics_port=metrics_port)
    return proc.wait_ready() if ready else proc


def start_gateway(log_dir: Path, upstream_port: int, healthy: bool = True, **config) -> EnvoyProcess:
    """Envoy on a free 127.0.0.1 port in front of `upstream_port`; with `healthy`, once its
    health check has passed the upstream (/healthz answers 200)."""
    envoy = EnvoyProcess(
        GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=upstream_port, **config),
        log_path=Path(log_dir) / f"envoy-{upstream_port}.log",
    ).wait_listening()
    if healthy:
        try:
            wait_for(lambda: requests.get(envoy.url + "/healthz", timeout=5).status_code == 200,
                     lambda: f"the gateway's upstream passing its health check:\n{envoy.log()[-4000:]}", timeout=30)
        except BaseException:
            envoy.stop()
            raise
    return envoy


def post(envoy, path, body, **kwargs) -> requests.Response:
    return requests.post(envoy.url + path, json=body, timeout=120, **kwargs)


def body(sequences, include=None, repr_layers=None) -> dict:
    """A JSON request body (BioLM's shape)."""
    out: dict = {"items": [{"sequence": s} for s in sequences]}
    params = {k: v for k, v in (("include", include), ("repr_layers", repr_layers)) if v is not None}
    if params:
        out["params"] = params
    return out


def wait_for(condition, what="condition", timeout: float = 60) -> None:
    """Poll `condition` (something observable: a metric, a log line, a health state) until it
    is true; fail after `timeout` seconds, naming `what` (a string, or a callable giving one).
    A condition that raises (e.g. a connection refused) counts as not yet true."""
    end = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            if condition():
                return
        except (OSError, requests.RequestException, grpc.RpcError) as exc:
            last_error = exc
        if time.monotonic() > end:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {said}"
                                 + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(0.02)


def envoy_admin_get(socket_path, path: str, timeout: float = 10) -> str:
    """GET from Envoy's admin interface, which listens only on a Unix socket (mode 0600)."""
    import http.client
    import socket

    class _UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(socket_path))

    connection = _UnixConnection("localhost", timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def envoy_hosts(socket_path, timeout: float = 10) -> dict[str, dict[str, str]]:
    """Envoy's per-host stats from /clusters ("cluster::address::stat::value" lines), by address
    ("127.0.0.1:50051") then stat ("health_flags", "rq_success", ...); a host in two clusters
    shows its first cluster's."""
    hosts: dict[str, dict[str, str]] = {}
    for line in envoy_admin_get(socket_path, "/clusters", timeout).splitlines():
        parts = line.split("::")
        if len(parts) == 4:
            hosts.setdefault(parts[1], {}).setdefault(parts[2], parts[3])
    return hosts


def envoy_counters(socket_path, pattern: str, timeout: float = 10) -> dict[str, int]:
    """Envoy's counters and gauges whose names match the regex `pattern`, by full name (histograms,
    whose values are not integers, are left out)."""
    text = envoy_admin_get(socket_path, f"/stats?filter={pattern}", timeout)
    pairs = (line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {name: int(value) for name, value in pairs if value.strip().isdigit()}


# ---- the esm2 command line ----------------------------------------------------------------
ESM2 = Path(sys.executable).with_name("esm2")
ESM2_COMMAND = [str(ESM2)] if ESM2.exists() else [sys.executable, "-m", "esm2_client.cli"]


def esm2(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*ESM2_COMMAND, *map(str, args)], capture_output=True, text=True, timeout=120, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


# A run's provenance as the CLI takes it from ListModels (esm2_wire.provenance).
PROVENANCE = {"model": "esm2-tiny", "weights_fingerprint": "sha256:" + "0" * 64, "random_weights": True,
              "precision": "fp32", "server_version": "0.1.0"}


def write_fasta(path: Path, records: dict[str, str], gzipped: bool = False) -> Path:
    text = "".join(f">{name}\n{seq[i:i + 60]}\n" if i == 0 else f"{seq[i:i + 60]}\n"
                   for name, seq in records.items() for i in range(0, len(seq), 60))
    if gzipped:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


# ---- headless Chromium (the docs page and the playground) ----------------------------------
# Debian's chromium and chromium-driver (.ci/run installs them in CI); selenium (dev extra) drives them.
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed: apt-get install chromium chromium-driver (.ci/run does in CI)")


def chromium(profile_dir: Path, downloads: Path | None = None, window: str = "1280,2000"):
    """A headless Chromium with a fresh profile in `profile_dir`, its console logged; files it
    downloads land in `downloads`. The caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={window}",
                 f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    if downloads is not None:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def browser_wait(driver, condition, timeout: float = 60):
    """condition(driver)'s first truthy value, polled every 0.1 s."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
