"""Messages never grow with the input (issue 9, section 1): echoes cut, whole messages cut."""

import grpc

from service import errors
from service.errors import MAX_ECHO_CHARS, MAX_MESSAGE_CHARS, InvalidRequest, WorkerLost, echo


def test_short_values_are_echoed_like_repr():
    assert echo("esm2-15b") == "'esm2-15b'"
    assert echo("caf\u00e9") == "'caf\\xe9'"  # ASCII, so percent-encoding cannot inflate it


def test_long_values_are_cut_with_their_length():
    text = echo("\u00e9" * 70_000)
    assert text.startswith("'\\xe9") and text.endswith("... (70000 characters)")
    assert text.isascii() and len(text) <= MAX_ECHO_CHARS + len(" (70000 characters)")


def test_status_cuts_every_message_and_keeps_retry_after():
    code, message, trailers = errors.status(InvalidRequest("x" * 100_000), "Encode")
    assert code is grpc.StatusCode.INVALID_ARGUMENT and trailers == ()
    assert len(message) == MAX_MESSAGE_CHARS and message.endswith(f"(message cut at {MAX_MESSAGE_CHARS} characters)")
    code, _, trailers = errors.status(WorkerLost("gone"), "Encode")
    assert code is grpc.StatusCode.UNAVAILABLE and trailers == (("retry-after", "1"),)
