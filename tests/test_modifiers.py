"""Labels: one table of modifiers writes a config's label, reads labels back, and gives the
command line its flags and listing; a label gives each setting once."""

import pytest

from minqkv import modifiers
from minqkv.model import GPTConfig
from minqkv.modifiers import MODIFIERS, Number

TINY = dict(vocab_size=7, block_size=8, n_layer=1, n_head=4, n_embd=8)


def example(row) -> str:
    """A row as it could be written in a label: 'rotate', 'gqa2'."""
    return row.token + (str(row.value.example) if isinstance(row.value, Number) else "")


# ---- reading and writing ------------------------------------------------------------------------


@pytest.mark.parametrize("row", MODIFIERS, ids=lambda row: row.token)
def test_each_modifier_of_the_table_sets_its_field(row):
    settings = GPTConfig.overrides_from_label("abc+" + example(row))
    expected = row.value.example if isinstance(row.value, Number) else row.value
    assert settings == {"code": "abc", row.field: expected}


def test_a_label_lists_the_modifiers_in_the_order_of_the_table():
    config = GPTConfig(**{**TINY, "n_layer": 2}, code="abb", out_proj=False, n_kv_head=2, latent_kv=4,
                       out_gate=True, pos="rope", gate=True, rotate=True)
    assert config.variant_label() == "abb+rotate+gate+rope+out-gate+latent-kv4+gqa2+no-out-proj"


def test_one_key_value_head_is_written_mqa_and_as_many_as_query_heads_not_at_all():
    assert GPTConfig(**TINY, n_kv_head=1).variant_label() == "abc+mqa"
    assert GPTConfig(**TINY, n_kv_head=4).variant_label() == "abc"


def test_an_unknown_modifier_is_refused_with_every_modifier_of_the_table():
    with pytest.raises(ValueError, match="unknown modifier 'spin' in 'abc\\+spin'") as info:
        GPTConfig.overrides_from_label("abc+spin")
    assert all(row.written() in str(info.value) for row in MODIFIERS)


# ---- each setting once --------------------------------------------------------------------------


@pytest.mark.parametrize("label, field", [("abc+rope+no-pos", "pos"), ("abc+mqa+gqa2", "n_kv_head"),
                                          ("abc+gqa2+gqa4", "n_kv_head"), ("abc+mqa+gqa1", "n_kv_head"),
                                          ("abc+latent-kv4+latent-kv8", "latent_kv")])
def test_two_modifiers_that_set_one_field_are_refused(label, field):
    with pytest.raises(ValueError, match=f"sets {field} twice"):
        GPTConfig.overrides_from_label(label)


@pytest.mark.parametrize("label", ["abc+rotate+rotate", "abc+gqa2+gqa2", "abc+rope+out-gate+rope"])
def test_a_modifier_given_twice_is_refused_even_with_the_same_value(label):
    with pytest.raises(ValueError, match="twice: give each modifier once"):
        GPTConfig.overrides_from_label(label)


def test_sym_init_and_latent_keys_and_values_cannot_go_together():
    with pytest.raises(ValueError, match="combines 'sym-init' and 'latent-kv4', which cannot go together"):
        GPTConfig.overrides_from_label("abc+sym-init+latent-kv4")


@pytest.mark.parametrize("modifier", ["gqa\u0662", "latent-kv\uff13\uff12", "gqa\u00b2"])
def test_numbers_in_a_label_are_ascii_digits_only(modifier):
    """str.isdigit() takes Arabic-Indic, full-width and superscript digits; a label does not."""
    with pytest.raises(ValueError, match="ASCII digits 0-9"):
        GPTConfig.overrides_from_label("abc+" + modifier)


# ---- the command line ---------------------------------------------------------------------------


def test_a_field_set_by_one_switch_gets_the_switch_as_its_flag():
    flags = {field: (flag, kind) for flag, field, kind, _ in modifiers.flag_rows()}
    assert flags["rotate"] == ("--rotate", bool)
    assert flags["out_proj"] == ("--no-out-proj", bool)  # a --no- switch sets its field to False


def test_a_field_with_values_gets_a_flag_named_after_it_whose_help_lists_them():
    rows = {field: (flag, kind, help_text) for flag, field, kind, help_text in modifiers.flag_rows()}
    assert rows["pos"][:2] == ("--pos", str) and "rope: " in rows["pos"][2] and "none: " in rows["pos"][2]
    assert rows["n_kv_head"][:2] == ("--n-kv-head", int) and "1: " in rows["n_kv_head"][2]
    assert rows["latent_kv"][:2] == ("--latent-kv", int)


def test_the_flags_cover_each_field_a_modifier_sets_once_and_only_config_fields():
    fields = [field for _, field, _, _ in modifiers.flag_rows()]
    assert sorted(fields) == sorted({row.field for row in MODIFIERS})
    assert set(fields) <= set(GPTConfig.__dataclass_fields__)


def test_the_listing_has_each_modifier_on_its_own_line_as_written_in_a_label():
    lines = modifiers.listing().splitlines()
    assert [line.split()[0] for line in lines] == [row.written() for row in MODIFIERS]
    assert "latent-kvR" in modifiers.listing() and "gqaN" in modifiers.listing()


def test_the_readme_names_every_modifier_of_the_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [row.written() for row in MODIFIERS if row.token not in readme]
    assert missing == []
