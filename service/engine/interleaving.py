"""What a worker tells the dispatcher about a batch run between another batch's layers.

Its own module, torch-free, so that the worker (which imports torch) and the dispatcher (which
must not) both import it and neither imports the other.
"""

from __future__ import annotations


class RunAfterRunningBatch(Exception):
    """Raised by a worker when a batch run between another's layers runs out of memory: the
    running batch's activations still hold the device's memory, so the Interleaver runs it again
    (whole, or halved as usual) once that batch has ended, instead of halving it now."""
