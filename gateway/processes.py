"""Child processes of the gateway launcher: starting a child that dies with its parent, free
local ports, and stopping a child in order."""

from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

try:
    import fcntl
except ImportError:  # Windows: no record locks; ports are then unique within one process only
    fcntl = None

_LOWEST_PORT = 10000  # below this sit well-known services
_RANDOM = random.SystemRandom()  # not the seedable module state: two processes must not draw the same ports
_handed_out: set[int] = set()  # this process never hands a port out twice
# Ports handed out by any process on this host: the byte at offset `port` of this file is
# record-locked by the process that drew it, until that process exits (the kernel drops the lock).
_CLAIMS_PATH = os.path.join(tempfile.gettempdir(), f"esm2-free-ports-{os.getuid() if hasattr(os, 'getuid') else 0}.lock")
_claims_fd: int | None = None


# ---- children that die with their parent -------------------------------------------------
# On Linux the kernel sends a child its parent-death signal (prctl PR_SET_PDEATHSIG) when the
# thread that forked it exits; for the main thread, that is the process. SIGKILL: a parent that
# dies without stopping its children (SIGKILL, the OOM killer) took Envoy down with it, so a
# replica's drain has nobody to drain to; it is the signal that cannot be caught or ignored.
# util-linux's setpriv asks for it and execs the child, so no Python runs between fork and exec:
# a preexec_fn forces a full fork of this threaded process and runs the interpreter's at-fork
# hooks in the child, which once aborted an Envoy's start (signal 6) in a full test run. The
# shell step ends a child whose parent died before the request was made (it is then init's).
# Elsewhere (macOS, or no setpriv) children outlive a killed parent: there is no signal to ask for.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
_STILL_OURS = '[ "$PPID" = "$0" ] || exit 137; exec "$@"'  # $0: the parent's pid; "$@": the child
# Children asked for from a thread that may end (a test's helper thread) are forked by this one
# thread instead, which lives as long as the process: it waits on its queue, it does not poll.
_forker: concurrent.futures.ThreadPoolExecutor | None = None
_forker_lock = threading.Lock()


def dies_with_parent(argv: list[str]) -> list[str]:
    """argv wrapped so that the child gets SIGKILL when this process (the forking thread) dies."""
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _STILL_OURS, str(os.getpid()), *argv]


def start_child(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(argv, **popen_kwargs) for a child that ends when this process ends, however
    it ends (on Linux): a SIGKILLed launcher leaves no replica or Envoy holding its ports. The pid
    is the child's own (setpriv and the shell exec it)."""
    if _SETPRIV is None:
        return subprocess.Popen(argv, **popen_kwargs)

    def popen() -> subprocess.Popen:
        return subprocess.Popen(dies_with_parent(argv), **popen_kwargs)

    if threading.current_thread() is threading.main_thread():
        return popen()
    global _forker
    with _forker_lock:
        if _forker is None:
            _forker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="child-forker")
    return _forker.submit(popen).result()


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (inclusive)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535  # the IANA range, which macOS and Windows use


def free_port(room: int = 1) -> int:
    """A port free on 127.0.0.1 now, with the next room - 1 ports free too, for a child to bind.

    It lies outside the ephemeral range. Every outgoing connection takes its local port from that
    range, Envoy's health checks included, so a port picked there can be taken before the child
    binds it. Outside that range only another explicit bind can take it. (Where that range leaves
    fewer than 1000 ports, the draw is from every port from _LOWEST_PORT up, ephemeral ones included.)

    No two processes on the host are handed the same port while the first lives (_claim): the
    parallel test workers, several launchers, each drawing before its children bind.
    """
    low, high = ephemeral_port_range()
    candidates = max(range(_LOWEST_PORT, low - room), range(high + 1, 65536 - room), key=len)
    if len(candidates) < 1000:  # the ephemeral range covers nearly every port: draw from them all
        candidates = range(_LOWEST_PORT, 65536 - room)
    for _ in range(1000):
        port = _RANDOM.choice(candidates)
        block = range(port, port + room)
        if not _handed_out.intersection(block) and all(_bindable(p) for p in block) and _claim(port, room):
            _handed_out.update(block)
            return port
    raise RuntimeError(f"no {room} free port(s) on 127.0.0.1 in {candidates.start}-{candidates.stop - 1}")


def _claim(port: int, room: int) -> bool:
    """Claims ports port .. port + room - 1 for this process's lifetime, against every other process
    using free_port: a bindable port can still be drawn by a second process before the first one's
    child binds it. POSIX record locks (not flock) on one file: one descriptor holds any number of
    them, they are not inherited by children, and they vanish when the process dies, however it dies.
    The descriptor stays open: closing any descriptor of the file would drop this process's locks."""
    global _claims_fd
    if fcntl is None:
        return True
    if _claims_fd is None:
        try:
            _claims_fd = os.open(_CLAIMS_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # no writable temp directory: unique within this process only
            _claims_fd = -1
    if _claims_fd < 0:
        return True
    try:
        fcntl.lockf(_claims_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, room, port)
    except OSError:  # held by another live process
        return False
    return True


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
