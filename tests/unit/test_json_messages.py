"""The JSON body's cut into gateway messages: exact-size messages as the body grows, the rest at
the end, nothing lost or reordered; a body under one message is held back whole until it ends
(then a replica's death can cut it short only between its one message and the call's status)."""

from hypothesis import given
from hypothesis import strategies as st

from service.api.rendering import JsonMessages, json_body, json_piece


@given(st.lists(st.binary(max_size=40), max_size=12), st.integers(min_value=1, max_value=16))
def test_messages_are_the_body_in_order_in_exact_sizes(pieces, size):
    messages = JsonMessages(size)
    sent = []
    for piece in pieces:
        sent += messages.add(piece)
    assert all(isinstance(m, bytes) and len(m) == size for m in sent)
    rest = messages.rest()
    assert len(rest) < size and messages.rest() == b""
    assert b"".join(sent) + rest == b"".join(pieces)


def test_a_body_under_one_message_is_sent_only_at_its_end():
    messages = JsonMessages(1 << 20)
    results = [{"a": 1}, {"b": 2}]
    for index, result in enumerate(results):
        assert messages.add(json_piece(result, first=index == 0, last=index == 1)) == []
    assert messages.rest() == json_body(results) == b'{"results":[{"a":1},{"b":2}]}'


def test_a_large_piece_is_sliced_after_what_was_pending():
    messages = JsonMessages(4)
    assert messages.add(b"ab") == []
    assert messages.add(b"cdefghijk") == [b"abcd", b"efgh"]
    assert messages.rest() == b"ijk"
