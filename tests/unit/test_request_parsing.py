"""Request parsing and validation, without a server: tokens, output kinds, layers, and the
errors that name the field, item and problem (the end-to-end table is in test_validation.py)."""

import pytest

from esm2_wire.output_kinds import OutputKind
from esm2_wire.vocabulary import MASK, Limits
from service.errors import InvalidRequest
from service.api.request_schema import request_schema
from service.api.validation import parse_items, parse_options

LIMITS = Limits(max_items=3, max_sequence_length=6)


def test_sequences_become_one_token_per_position():
    items = parse_items(["MKT-X", "A"], predict=False, limits=LIMITS)
    assert [item.tokens for item in items] == [("M", "K", "T", "-", "X"), ("A",)]
    (masked,) = parse_items([f"{MASK}K{MASK}{MASK}"], predict=True, limits=LIMITS)
    assert masked.tokens == (MASK, "K", MASK, MASK)


def test_a_mask_counts_as_one_residue_against_the_length_limit():
    parse_items([MASK * 6], predict=True, limits=LIMITS)
    with pytest.raises(InvalidRequest, match=r"items\[0\].sequence: 7 residues; at most 6 are allowed"):
        parse_items([MASK * 7], predict=True, limits=LIMITS)


def test_every_item_problem_is_reported_at_once_in_item_order():
    with pytest.raises(InvalidRequest) as refused:
        parse_items(["MK", "mk", "", "M K"], predict=False, limits=Limits(max_items=4, max_sequence_length=6))
    assert str(refused.value) == (
        "items[1].sequence: invalid character lowercase letter 'm' (use upper case) at position 1; "
        "allowed: ACDEFGHIKLMNPQRSTVWY, BXZUO and '-'; items[2].sequence: must not be empty; "
        "items[3].sequence: invalid character whitespace ' ' at position 2; allowed: ACDEFGHIKLMNPQRSTVWY, BXZUO and '-'"
    )


@pytest.mark.parametrize("count", [0, 4])
def test_the_item_count_is_bounded(count):
    with pytest.raises(InvalidRequest, match=f"items: expected 1 to 3 items, got {count}"):
        parse_items(["MK"] * count, predict=False, limits=LIMITS)


def test_include_names_become_output_kinds_once():
    options = parse_options(["per_residue", "mean", "contacts", "mean"], [], num_layers=6, model="m")
    assert options.outputs == {OutputKind.PER_TOKEN, OutputKind.MEAN, OutputKind.CONTACTS}
    assert parse_options([], [], 6, "m").outputs == {OutputKind.MEAN}  # the default


def test_layers_are_made_absolute_deduplicated_and_kept_in_request_order():
    assert parse_options([], [-1, 0, 6, 3, -4], num_layers=6, model="m").layers == (6, 0, 3)
    assert parse_options([], [], num_layers=6, model="m").layers == (6,)


def test_option_errors_name_the_index_and_the_allowed_values():
    with pytest.raises(InvalidRequest) as refused:
        parse_options(["mean", "embeddings"], [7, -8], num_layers=6, model="esm2-8m")
    assert str(refused.value) == (
        "params.include[1]: unknown value 'embeddings'; allowed: mean, per_token, bos, contacts, logits, attentions "
        "(per_residue is an alias of per_token); "
        "params.repr_layers[0]: layer 7 is out of range for esm2-8m (6 layers); allowed: -7 to 6; "
        "params.repr_layers[1]: layer -8 is out of range for esm2-8m (6 layers); allowed: -7 to 6"
    )


def test_the_request_schema_lists_what_the_parser_accepts():
    schema = request_schema("esm2-8m", "encode", LIMITS)
    include = schema["properties"]["params"]["properties"]["include"]["items"]["enum"]
    assert [OutputKind.parse(name) is not None for name in include] == [True] * len(include)
    assert len(include) == len(OutputKind) + 1  # plus the per_residue alias
    assert schema["properties"]["items"]["maxItems"] == 3
