"""Specification of the attention variants: the code grammar, what each variant costs, when its
scores are symmetric, the rotation and gate modifiers, and exact gradients for every variant."""

import itertools

import numpy as np
import pytest

from minqkv.attention import (ALL_CODES, AttentionShape, CausalSelfAttention, KVCache,
                              canonical_code, parse_variant)
from minqkv.model import GPT, GPTConfig
from minqkv.optim import AdamW
from minqkv.tensor import Tensor, no_grad
from minqkv.variant_checks import check_variant, variant_cases

C, H = 16, 4  # width and heads of the small layers below
SYMMETRIC_CODES = {"aab", "aaa", "--a", "aa-", "---"}


def perturbed_attention(shape: AttentionShape, seed: int = 0) -> CausalSelfAttention:
    """A float64 layer whose every parameter (rotation and position bias too) is random."""
    attn = CausalSelfAttention(shape, dtype=np.float64, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 100)
    for _, p in attn.named_parameters():
        p.data += 0.3 * rng.standard_normal(p.shape)
    return attn


def random_input(T: int = 6, seed: int = 1) -> Tensor:
    return Tensor(np.random.default_rng(seed).standard_normal((2, T, C)))


def max_asymmetry(scores: np.ndarray) -> float:
    return float(np.abs(scores - np.swapaxes(scores, -1, -2)).max())


# ---- the grammar of codes --------------------------------------------------------------------


def test_there_are_exactly_15_codes():
    every_spelling = {canonical_code("".join(c)) for c in itertools.product("abc-", repeat=3)}
    assert len(ALL_CODES) == 15
    assert set(ALL_CODES) == every_spelling


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_code_parses_to_itself(code):
    assert parse_variant(code) == code


@pytest.mark.parametrize("name, code", [
    ("canonical", "abc"), ("shared-qk", "aab"), ("no-key", "aab"), ("shared-kv", "abb"),
    ("shared-qv", "aba"), ("single", "aaa"), ("shared-qkv", "aaa"), ("no-query", "-ab"),
    ("no-value", "ab-"), ("value-only", "--a"), ("none", "---"),
])
def test_every_alias_resolves_to_its_code(name, code):
    assert parse_variant(name) == code


def test_aliases_ignore_case_and_surrounding_spaces():
    assert parse_variant("  Shared-KV ") == "abb"


@pytest.mark.parametrize("spelling, code", [("bab", "aba"), ("cc-", "aa-"), ("cba", "abc"),
                                            ("b-b", "a-a"), ("-cb", "-ab"), ("bbb", "aaa")])
def test_letters_are_renamed_in_order_of_first_appearance(spelling, code):
    assert parse_variant(spelling) == code


@pytest.mark.parametrize("bad", ["abd", "ab", "abcd", "xyz", "", "shared", "a b"])
def test_invalid_variant_raises_and_lists_the_valid_codes(bad):
    with pytest.raises(ValueError) as info:
        parse_variant(bad)
    message = str(info.value)
    assert repr(bad) in message
    for code in ALL_CODES:
        assert code in message
    assert "shared-kv" in message


def test_a_variant_that_is_not_a_string_raises_type_error():
    with pytest.raises(TypeError, match="string"):
        parse_variant(3)


# ---- shapes that cannot exist --------------------------------------------------------------


@pytest.mark.parametrize("code", ["aab", "aba", "aaa"])
def test_query_cannot_share_a_weight_with_narrower_grouped_keys_or_values(code):
    with pytest.raises(ValueError, match="cannot share one weight"):
        AttentionShape(code=code, n_embd=C, n_head=H, n_kv_head=2)


@pytest.mark.parametrize("code, role", [("a-b", "K"), ("ab-", "V"), ("--a", "K"), ("---", "K")])
def test_identity_key_or_value_needs_all_heads(code, role):
    with pytest.raises(ValueError, match=f"identity {role}"):
        AttentionShape(code=code, n_embd=C, n_head=H, n_kv_head=1)


@pytest.mark.parametrize("code", ["abc", "abb", "-ab", "-aa"])
def test_grouped_query_attention_accepts_untied_query(code):
    shape = AttentionShape(code=code, n_embd=C, n_head=H, n_kv_head=1)
    assert shape.width("k") == shape.width("v") == C // H


def test_n_kv_head_must_divide_n_head():
    with pytest.raises(ValueError, match="must divide n_head"):
        AttentionShape(code="abc", n_embd=C, n_head=H, n_kv_head=3)


def test_n_embd_must_be_a_multiple_of_n_head():
    with pytest.raises(ValueError, match="multiple of n_head"):
        AttentionShape(code="abc", n_embd=10, n_head=4)


# ---- parameter counts ------------------------------------------------------------------------


def shapes_with_modifiers():
    """Every code under every modifier it accepts, as AttentionShape keyword sets."""
    modifiers = [{}, dict(rotate=True), dict(pos2d=True), dict(gate=True), dict(out_proj=False),
                 dict(n_kv_head=2), dict(n_kv_head=1),
                 dict(rotate=True, pos2d=True, gate=True, n_kv_head=2, out_proj=False)]
    cases = []
    for code, mods in itertools.product(ALL_CODES, modifiers):
        try:
            AttentionShape(code=code, n_embd=C, n_head=H, block_size=8, **mods)
        except ValueError:
            continue
        cases.append(pytest.param(code, mods, id=code + "".join(f"+{k}={v}" for k, v in mods.items())))
    return cases


@pytest.mark.parametrize("code, modifiers", shapes_with_modifiers())
def test_params_counts_the_layers_actual_parameters(code, modifiers):
    shape = AttentionShape(code=code, n_embd=C, n_head=H, block_size=8, **modifiers)
    attn = CausalSelfAttention(shape)
    assert shape.params() == attn.num_parameters()


@pytest.mark.parametrize("code, out_proj, squares", [
    ("abc", True, 4), ("abc", False, 3), ("abb", True, 3), ("aab", True, 3), ("aaa", True, 2),
    ("-ab", True, 3), ("--a", True, 2), ("---", True, 1), ("---", False, 0),
])
def test_params_is_a_tied_weight_once_and_identity_free(code, out_proj, squares):
    assert AttentionShape(code=code, n_embd=C, n_head=H, out_proj=out_proj).params() == squares * C * C


def test_params_of_multi_query_attention_has_one_narrow_key_and_value():
    hd = C // H
    assert AttentionShape(code="abc", n_embd=C, n_head=H, n_kv_head=1).params() == 2 * C * C + 2 * C * hd


def test_params_of_modifiers_rotation_position_bias_and_gates():
    base = AttentionShape(code="abc", n_embd=C, n_head=H, block_size=8).params()
    hd = C // H
    assert AttentionShape(code="abc", n_embd=C, n_head=H, block_size=8, rotate=True).params() == base + H * hd * hd
    assert AttentionShape(code="abc", n_embd=C, n_head=H, block_size=8, pos2d=True).params() == base + H * 64
    assert AttentionShape(code="abc", n_embd=C, n_head=H, block_size=8, gate=True).params() == base + 3


@pytest.mark.parametrize("code, matrices_saved", [("abb", 1), ("aab", 1), ("-ab", 1), ("aaa", 2),
                                                   ("--a", 2), ("---", 3)])
def test_flops_drop_by_one_projection_for_each_matrix_saved(code, matrices_saved):
    canonical = AttentionShape(code="abc", n_embd=C, n_head=H).flops_per_token()
    flops = AttentionShape(code=code, n_embd=C, n_head=H).flops_per_token()
    assert canonical - flops == matrices_saved * 2 * C * C


# ---- KV cache size ---------------------------------------------------------------------------


def test_shared_kv_caches_half_of_canonical():
    abc = AttentionShape(code="abc", n_embd=C, n_head=H).kv_cache_floats_per_token()
    abb = AttentionShape(code="abb", n_embd=C, n_head=H).kv_cache_floats_per_token()
    assert abc == 2 * C
    assert abb * 2 == abc


@pytest.mark.parametrize("code, floats", [("---", C), ("a--", C), ("-aa", C), ("--a", 2 * C),
                                          ("aaa", C), ("aab", 2 * C)])
def test_a_tensor_serving_as_key_and_value_is_cached_once(code, floats):
    assert AttentionShape(code=code, n_embd=C, n_head=H).kv_cache_floats_per_token() == floats


def test_multi_query_caches_one_head_of_keys_and_values():
    hd = C // H
    assert AttentionShape(code="abc", n_embd=C, n_head=H, n_kv_head=1).kv_cache_floats_per_token() == 2 * hd
    assert AttentionShape(code="abb", n_embd=C, n_head=H, n_kv_head=1).kv_cache_floats_per_token() == hd


def test_an_empty_cache_stores_nothing():
    assert KVCache().floats_per_token() == 0


@pytest.mark.parametrize("label", list(ALL_CODES) + ["abb+gate", "aaa+gate", "abb+rotate", "abc+gqa2",
                                                     "abb+mqa", "-aa+mqa", "abb+gate+gqa2"])
def test_measured_cache_after_decoding_matches_the_formula(label):
    overrides = GPTConfig.overrides_from_label(label)
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=H, n_embd=C, **overrides))
    caches = model.new_caches()
    with no_grad():
        model(np.array([[1, 2, 3]]), caches=caches)
        model(np.array([[4]]), caches=caches)
    assert caches[0].length == 4
    assert caches[0].floats_per_token() == model.blocks[0].attn.shape.kv_cache_floats_per_token()


# ---- symmetry of the scores ------------------------------------------------------------------


def test_symmetric_codes_are_those_whose_query_and_key_are_one_tensor():
    symmetric = {code for code in ALL_CODES if AttentionShape(code=code).symmetric()}
    assert symmetric == SYMMETRIC_CODES


@pytest.mark.parametrize("label", list(ALL_CODES) + ["aaa+rotate", "aab+rotate", "--a+rotate",
                                                     "aaa+pos2d", "aab+pos2d", "---+pos2d"])
def test_scores_are_symmetric_exactly_when_the_variant_says_so(label):
    overrides = GPTConfig.overrides_from_label(label)
    code = overrides.pop("variant")
    shape = AttentionShape(code=code, n_embd=C, n_head=H, block_size=8, **overrides)
    scores = perturbed_attention(shape).attention_scores(random_input())  # (B, H, T, T)
    assert scores.shape == (2, H, 6, 6)
    if shape.symmetric():
        assert max_asymmetry(scores) < 1e-12
    else:
        assert max_asymmetry(scores) > 1e-3


# ---- the learned rotation --------------------------------------------------------------------


def test_rotation_starts_at_the_identity():
    attn = CausalSelfAttention(AttentionShape(code="aaa", n_embd=C, n_head=H, rotate=True), dtype=np.float64)
    R = attn.rotation().data  # (H, hd, hd)
    assert R.shape == (H, C // H, C // H)
    assert np.array_equal(R, np.broadcast_to(np.eye(C // H), R.shape))


@pytest.fixture(scope="module")
def rotated_models():
    """aaa and aab models with rotate=True after a few AdamW steps (float64)."""
    models = {}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, (4, 8))
    targets = np.roll(ids, -1, axis=1)
    for code in ("aaa", "aab"):
        model = GPT(GPTConfig(vocab_size=6, block_size=8, n_layer=1, n_head=2, n_embd=8, variant=code,
                              rotate=True, dtype="float64"))
        opt = AdamW(model.named_parameters(), lr=3e-2)
        for _ in range(5):
            _, loss = model(ids, targets)
            model.zero_grad()
            loss.backward()
            opt.step()
        models[code] = model
    return models


@pytest.mark.parametrize("code", ["aaa", "aab"])
def test_rotation_stays_orthogonal_after_training(rotated_models, code):
    R = rotated_models[code].blocks[0].attn.rotation().data  # (H, hd, hd)
    eye = np.eye(R.shape[-1])
    assert np.abs(R - eye).max() > 1e-2  # training moved it
    assert np.abs(np.swapaxes(R, -1, -2) @ R - eye).max() < 1e-10


@pytest.mark.parametrize("code", ["aaa", "aab"])
def test_trained_rotation_makes_shared_query_key_scores_asymmetric(rotated_models, code):
    attn = rotated_models[code].blocks[0].attn
    x = Tensor(np.random.default_rng(3).standard_normal((1, 5, 8)))
    assert max_asymmetry(attn.attention_scores(x)) > 1e-4


# ---- gates and the position bias -------------------------------------------------------------


def test_gate_mixes_projection_with_identity():
    attn = perturbed_attention(AttentionShape(code="abc", n_embd=C, n_head=H, gate=True))
    attn.gate_q.data[:] = 0.3
    x = random_input()
    g = 1 / (1 + np.exp(-0.3))
    expected = g * (x.data @ attn.w_q.data) + (1 - g) * x.data  # out = g xW + (1-g) x
    np.testing.assert_allclose(attn.role("q", x, {}).data, expected, rtol=1e-13, atol=1e-13)


def test_gates_start_equal_and_strictly_between_identity_and_projection():
    attn = CausalSelfAttention(AttentionShape(code="abc", n_embd=C, n_head=H, gate=True))
    gates = {float(attn.gate(role).data[0]) for role in "qkv"}
    assert len(gates) == 1
    assert 0 < gates.pop() < 1


def test_only_full_width_projections_are_gated():
    assert AttentionShape(code="abc", n_embd=C, n_head=H, gate=True).gated_roles() == "qkv"
    assert AttentionShape(code="-ab", n_embd=C, n_head=H, gate=True).gated_roles() == "kv"
    assert AttentionShape(code="abb", n_embd=C, n_head=H, n_kv_head=2, gate=True).gated_roles() == "q"
    assert AttentionShape(code="abc", n_embd=C, n_head=H).gated_roles() == ""


def test_position_bias_starts_at_zero_for_every_head_and_position_pair():
    attn = CausalSelfAttention(AttentionShape(code="aab", n_embd=C, n_head=H, block_size=8, pos2d=True))
    assert attn.pos_bias.shape == (H, 8, 8)
    assert not attn.pos_bias.data.any()


# ---- exact gradients for every variant -------------------------------------------------------


def test_variant_cases_cover_every_code_and_each_modifier():
    labels = [label for label, _ in variant_cases("all")]
    assert labels[:15] == list(ALL_CODES)
    for modifier in ("rotate", "pos2d", "gate", "gqa2", "mqa", "no-out-proj"):
        assert any(label.endswith("+" + modifier) for label in labels), modifier


def test_variant_cases_of_one_code_add_its_modifier_cases():
    labels = [label for label, _ in variant_cases("shared-kv")]
    assert labels == ["abb", "abb+gqa2", "abb+mqa", "abb+rotate+mqa"]


@pytest.mark.parametrize("label, overrides", variant_cases("all"), ids=[c[0] for c in variant_cases("all")])
def test_variant_gradients_match_finite_differences(label, overrides):
    result = check_variant(label, overrides)
    assert result.passed, f"{label}: max relative error {result.max_rel_err:.2e}"
    assert result.max_rel_err < 1e-6
