"""Positions a person reads are 1-based (issue 33): the server's refusals and the CLI's FASTA
checks name a bad letter by its 1-based position, as variants (K2A) and the CLI's CSVs count,
and give the same hints (upper case; a stop codon's '*' stripped)."""

from __future__ import annotations

import pytest

from esm2_client.fasta import InputError, read_fasta
from esm2_wire.vocabulary import Limits
from service.api.validation import InvalidRequest, parse_items


def test_the_servers_refusal_counts_from_one():
    with pytest.raises(InvalidRequest) as refused:
        parse_items(["MKTAYIAKQR*", "MK<mask>x"], predict=True, limits=Limits())
    text = str(refused.value)
    assert "items[0].sequence: invalid character '*' (a stop codon: strip it) at position 11;" in text
    # In a predict sequence the position counts characters, <mask> included: 'x' is the 9th.
    assert "items[1].sequence: invalid character lowercase letter 'x' (use upper case) at position 9;" in text


def test_the_clis_fasta_check_gives_the_servers_message(tmp_path):
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">p1 stop\nMKTAYIAKQR*\n>p2\nmktay\n>p3\nMKTAY\n")
    with pytest.raises(InputError) as refused:
        read_fasta(fasta)
    server = str(pytest.raises(InvalidRequest, parse_items, ["MKTAYIAKQR*", "mktay"], predict=False,
                               limits=Limits()).value)
    message = str(refused.value)
    assert message == (f"{fasta}: p1: invalid character '*' (a stop codon: strip it) at position 11, "
                       "p2: invalid character lowercase letter 'm' (use upper case) at position 1 "
                       "(allowed: -ABCDEFGHIKLMNOPQRSTUVWXYZ)")
    for hint in ("invalid character '*' (a stop codon: strip it) at position 11",
                 "invalid character lowercase letter 'm' (use upper case) at position 1"):
        assert hint in message and hint in server
