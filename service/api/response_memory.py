"""Bytes the server holds for responses not yet sent, bounded per stream and in total.

A stream's finished results stay in memory until its caller reads them. A caller that stops
reading (issue 16, attacks 1 and 4) would otherwise hold its whole response for as long as
it keeps the stream open, with no bound but the connection count. Every stream and unary
response counts what it holds here (the `esm_response_bytes_held` gauge). A stream whose
caller has taken nothing for STALL_SECONDS while it holds more than the per-stream bound,
or while the server holds more than the total bound, is ended with RESOURCE_EXHAUSTED and
a message that says what a slow consumer should do. A reader that keeps up is never blocked
that long, whatever it holds, and nothing is refused while the caller reads.
"""

from __future__ import annotations

import asyncio

import grpc

from service import metrics
from service.errors import SlowReader

# A write the caller has not taken for this long is a slow reader's (a busy machine can pause a
# reader that keeps up for a second or two). One write is one message: a stream chunk (1 MiB by
# default, at most 3 MiB) or 1 MiB of a JSON body, so a caller reading even 1 MB/s never waits this long.
STALL_SECONDS = 5.0
# A 2,048-residue item of the 8M shape with per_token for every layer is 18 MB; of the 650M shape
# with every layer, 346 MB: a reader that keeps up is never cancelled, however large.
DEFAULT_MAX_STREAM_HELD_MB = 128
DEFAULT_MAX_HELD_RESPONSE_MB = 1024


def slow_reader_message(held: int, limit: int, bound: str) -> str:
    return (
        f"stream cancelled: the caller read nothing for {STALL_SECONDS:g}s while this server held "
        f"{held / 2**20:.0f} MiB of its unsent response, over {bound}; a slow consumer should read "
        "the stream as it arrives and process it elsewhere (another thread or a file), ask for fewer items "
        "or layers per stream, or set stream_options.data_type to FLOAT16 or BFLOAT16"
    )


class ResponseMemory:
    """The server's ledger of unsent response bytes: one per server, shared by every RPC."""

    def __init__(self, per_stream_bytes: int, total_bytes: int):
        self.per_stream_bytes = per_stream_bytes
        self.total_bytes = total_bytes
        self.held = 0

    def _add(self, nbytes: int) -> None:
        self.held += nbytes
        metrics.RESPONSE_BYTES_HELD.set(self.held)


class HeldResponse:
    """What one response holds; all of it is given back when the RPC ends (a context manager)."""

    def __init__(self, memory: ResponseMemory, per_stream_bytes: int | None = None):
        self.memory = memory
        self.per_stream_bytes = memory.per_stream_bytes if per_stream_bytes is None else per_stream_bytes
        self.held = 0
        self.closed = False

    def take(self, nbytes: int) -> None:
        if not self.closed:  # results that finish after the RPC ended are not held by it
            self.held += nbytes
            self.memory._add(nbytes)

    def give_back(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.held)
        self.held -= nbytes
        self.memory._add(-nbytes)

    def __enter__(self) -> "HeldResponse":
        return self

    def __exit__(self, *exc) -> None:
        self.give_back(self.held)
        self.closed = True

    def over_bound(self) -> str | None:
        """Why this stream may not wait for its reader any longer, or None."""
        memory = self.memory
        if self.held > self.per_stream_bytes:
            bound = (f"the {self.per_stream_bytes >> 20} MiB per stream (--max-stream-held-mb)" if self.per_stream_bytes
                     else "nothing: a JSON response is not held for a caller that stops reading")
            return slow_reader_message(self.held, self.per_stream_bytes, bound)
        if self.held and memory.held > memory.total_bytes:
            return slow_reader_message(self.held, memory.total_bytes,
                                       f"the {memory.total_bytes >> 20} MiB for all unsent responses "
                                       f"(--max-held-response-mb; {memory.held >> 20} MiB held now)")
        return None

    async def send(self, context, message) -> None:
        """context.write(message); SlowReader once the caller has taken nothing for STALL_SECONDS while
        a bound is exceeded (the write is then left to fail with the call)."""
        write = asyncio.ensure_future(context.write(message))
        write.add_done_callback(_consume)
        while True:
            done, _ = await asyncio.wait((write,), timeout=STALL_SECONDS)
            if done:
                try:
                    return write.result()
                except grpc.aio.InternalError as exc:
                    # grpc's ExecuteBatchError: the call ended (cancelled, reset, past its deadline)
                    # under this write, in about 1 cancel in 6 before grpc cancels the handler. The
                    # same cancel, counted as one, and not a server error.
                    raise asyncio.CancelledError() from exc
            reason = self.over_bound()
            if reason is not None:
                raise SlowReader(reason)


def _consume(write: asyncio.Future) -> None:
    """Mark a write's failure seen: a call that ends under a pending write fails it, and that is no news."""
    if not write.cancelled():
        write.exception()
