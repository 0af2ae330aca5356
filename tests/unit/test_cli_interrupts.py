"""Ctrl-C during `esm2 embed`: never lost inside a write (h5py's finalizers would print and drop
it, and the run would go on waiting for the server), never delayed while the run waits."""

from __future__ import annotations

import signal

import pytest

from esm2_client.cli import _Interrupts


def test_an_interrupt_during_a_write_lets_the_item_finish_then_stops_the_run():
    interrupts = _Interrupts()
    written = []

    def add(name):
        interrupts._handle(signal.SIGINT, None)  # arrives in the middle of the write
        written.append(name)

    with pytest.raises(KeyboardInterrupt):
        interrupts.write(add, "a")
    assert written == ["a"] and interrupts.requested


def test_an_interrupt_while_waiting_raises_at_once():
    interrupts = _Interrupts()
    with pytest.raises(KeyboardInterrupt):
        interrupts._handle(signal.SIGINT, None)
    assert interrupts.requested


def test_an_interrupt_dropped_elsewhere_still_ends_the_run_at_the_next_item():
    interrupts = _Interrupts()
    try:
        interrupts._handle(signal.SIGTERM, None)
    except KeyboardInterrupt:
        pass  # as if a finalizer had swallowed it
    with pytest.raises(KeyboardInterrupt):
        interrupts.write(lambda: None)


def test_writes_without_an_interrupt_go_through():
    interrupts = _Interrupts()
    written = []
    interrupts.write(written.append, "a")
    interrupts.write(written.append, "b")
    assert written == ["a", "b"] and not interrupts.requested
