"""Where the windows of windowed mode lie (docs/long-proteins.md): shared by the server, which
runs them, and the client, which counts a Score request's passes before sending it."""

from __future__ import annotations

DEFAULT_LENGTH = 1022  # ESM-2's training crop, in residues


def window_starts(residues: int, length: int, stride: int) -> list[int]:
    """0-based starts of the windows of `length` residues covering an item of `residues`: every
    `stride` residues while a window still ends before the last residue, then one ending at it.
    An item no longer than `length` is one window."""
    if residues <= length:
        return [0]
    return [*range(0, residues - length, stride), residues - length]


def resolved(length: int, stride: int) -> tuple[int, int]:
    """params.window's (length, stride) with 0 read as the defaults: 1022, and half the length."""
    length = length or DEFAULT_LENGTH
    return length, stride or max(1, length // 2)
