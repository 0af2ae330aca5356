"""Child processes of the gateway launcher: free local ports, and stopping a child in order."""

from __future__ import annotations

import signal
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM (the server then finishes in-flight work), SIGKILL if it takes longer than timeout."""
    stop_processes([proc], timeout)
    return proc.returncode


def stop_processes(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """SIGTERM to all at once (one signal each: a second one cuts a server's drain window short),
    then SIGKILL whatever still runs after timeout."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
