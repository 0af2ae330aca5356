"""Each model's batch token budget, chosen for the device it runs on.

The best padded-token budget differs by device: on a small CPU, batches of 1-2k tokens keep
the layers' activations in cache and run faster than 8k ones; a GPU wants large batches.
`--max-batch-tokens device` (the default) takes the measured default for the device type
(DEVICE_DEFAULTS). `--max-batch-tokens sweep` measures this machine at start-up instead: it
times one transformer layer of the model on batches of 256-token rows at each candidate
budget, smallest first, bounded in time, and keeps the smallest budget within TOLERANCE of the
best rate (one layer stands for the stack: every layer has the same shapes, and the layers are
nearly all of the forward's time). A number is used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from service.models.checkpoints import LoadedModel
from service.models.forward import time_fast_layer
from service.platforms import Platform

log = logging.getLogger(__name__)

# The default budget per device type, from measurements (BENCHMARKS.md, "Batch budget"):
# on the 2-core CPU, stock fair-esm, HF sdpa and the service all run fastest on 1-2k-token batches
# (issue 11: 1.3-1.8x faster than 8k); the service keeps the smaller, for shorter waits.
# GPUs are not measured yet: 8192 (the former default for every device) until they are.
DEVICE_DEFAULTS = {"cpu": 1024, "cuda": 8192}
CANDIDATES = {"cpu": (512, 1024, 2048, 4096, 8192), "cuda": (2048, 4096, 8192, 16384)}
ROW_TOKENS = 256  # about the median protein (300 residues) rounded to a tile-friendly width
TOLERANCE = 0.05  # a smaller budget within 5% of the best rate wins: less waiting to fill, less padding
STOP_BELOW = 0.85  # stop sweeping once a budget is this far under the best so far
DEFAULT_SWEEP_SECONDS = 20.0


@dataclass(frozen=True)
class BudgetChoice:
    tokens: int
    source: str  # "measured at start-up" or "--max-batch-tokens"
    tokens_per_s: dict[int, float] = field(default_factory=dict)  # candidate budget -> one layer's rate

    def describe(self) -> str:
        rates = ", ".join(f"{b}: {r:,.0f}" for b, r in self.tokens_per_s.items())
        return f"{self.tokens} tokens ({self.source}{'; one-layer tokens/s ' + rates if rates else ''})"


def fixed(tokens: int) -> BudgetChoice:
    return BudgetChoice(tokens, "--max-batch-tokens")


def for_model(setting: str, loaded: LoadedModel, platform: Platform, stream, autocast: torch.dtype | None,
              sweep_seconds: float = DEFAULT_SWEEP_SECONDS) -> BudgetChoice:
    """`--max-batch-tokens`: a number (used as is), "device" (the measured table) or "sweep"
    (measured on `platform`, on the worker's own `stream`)."""
    if setting == "device":
        return BudgetChoice(DEVICE_DEFAULTS.get(platform.type, DEVICE_DEFAULTS["cuda"]),
                            f"measured default for {platform.type}")
    if setting == "sweep":
        return measure(loaded, platform, stream, autocast, sweep_seconds)
    return fixed(int(setting))


def most_tokens(setting: str, device: torch.device) -> int:
    """The largest budget a setting can choose on this device (for the memory estimate before loading)."""
    if setting == "device":
        return DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cuda"])
    if setting == "sweep":
        return max(CANDIDATES.get(device.type, CANDIDATES["cuda"]))
    return int(setting)


def choose(rates: dict[int, float]) -> int:
    """The smallest budget whose rate is within TOLERANCE of the best."""
    best = max(rates.values())
    return min(b for b, r in rates.items() if r >= (1 - TOLERANCE) * best)


def measure(loaded: LoadedModel, platform: Platform, stream, autocast: torch.dtype | None,
            seconds: float = DEFAULT_SWEEP_SECONDS) -> BudgetChoice:
    """Sweep the device's candidate budgets for one model (weights already on the device). The
    probes run on `stream`, the worker's: on CUDA the caching allocator keeps blocks per stream,
    so blocks cached by probes on another stream would serve the worker nothing."""
    candidates = CANDIDATES.get(platform.type, CANDIDATES["cuda"])
    precision = platform.autocast(autocast) if autocast else contextlib.nullcontext()
    deadline = time.monotonic() + seconds
    rates: dict[int, float] = {}

    def probe(rows: int) -> float:
        return time_fast_layer(loaded.model, rows, ROW_TOKENS, platform.tensor_device, platform.wait)  # its stream

    with platform.running_on(stream), precision:
        for budget in candidates:
            rows = max(1, budget // ROW_TOKENS)
            probe(rows)  # first call at a shape pays allocation
            best = min(probe(rows) for _ in range(2))
            rates[budget] = rows * ROW_TOKENS / best
            if rates[budget] < STOP_BELOW * max(rates.values()) or time.monotonic() > deadline:
                break
    return BudgetChoice(choose(rates), "measured at start-up", rates)
