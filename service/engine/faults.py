"""Fault injection for the tests: armed only by the environment at start-up, never by a request.

With ESM_FAULT_FILE=/some/path set when the server starts (a declared setting without a flag,
service.config), the model worker looks at that
file before each batch. When it holds a fault name, the fault fires once and the file is
removed. Without the variable there is no hook at all (the worker holds None). Nothing a
caller sends can create the file or set the variable.

Faults:
- batch-error: the batch raises a plain error (its items fail with INTERNAL; serving goes on).
- device-error: the batch raises what a CUDA device-side assert raises, and the device stays
  unusable afterwards, as after fair-esm issue #49.
- worker-exit: the worker thread dies (SystemExit raised in it).
- stall: the batch waits (up to STALL_LIMIT_S) until the file says something else, then acts
  on that; so a test can queue work behind a running batch before the fault fires.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

FAULTS = ("batch-error", "device-error", "worker-exit", "stall")
STALL_LIMIT_S = 60.0


class FaultHook:
    def __init__(self, path: Path):
        self.path = path
        self.device_poisoned = False

    @classmethod
    def armed(cls, path: Path | None) -> "FaultHook | None":
        """The hook for the server's ESM_FAULT_FILE setting; None when it is unset."""
        if path is None:
            return None
        log.warning("fault injection armed (ESM_FAULT_FILE=%s): for tests only", path)
        return cls(Path(path))

    def before_batch(self) -> None:
        """Raise the armed fault, if any (runs on the worker thread)."""
        fault = self._read()
        if fault == "stall":
            log.warning("injected stall")
            end = time.monotonic() + STALL_LIMIT_S
            while fault == "stall" and time.monotonic() < end:
                time.sleep(0.01)
                fault = self._read()
        if fault in ("", "stall"):  # nothing armed, or a stall that ran out of time
            return
        self.path.unlink(missing_ok=True)
        log.warning("injecting fault %r", fault)
        if fault == "batch-error":
            raise RuntimeError("injected fault: batch-error")
        if fault == "device-error":
            self.device_poisoned = True
            raise RuntimeError("CUDA error: device-side assert triggered (injected fault)")
        if fault == "worker-exit":
            raise SystemExit("injected fault: worker-exit")
        log.error("unknown fault %r in %s; known: %s", fault, self.path, ", ".join(FAULTS))

    def _read(self) -> str:
        try:
            return self.path.read_text().strip()
        except FileNotFoundError:
            return ""

    def check_device(self) -> None:
        if self.device_poisoned:
            raise RuntimeError("CUDA error: device-side assert triggered (injected fault, sticky)")
