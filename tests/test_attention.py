"""Specification of the attention variants: the code grammar, what each variant costs, when its
scores are symmetric, project and attend, the rotation and gate modifiers, and exact gradients for
every variant."""

import itertools
import math

import numpy as np
import pytest

from minqkv.attention import (ALL_CODES, AttentionSpec, CausalSelfAttention, KVCache, attend,
                              hard_concrete, names_of, parse_code, scores_and_weights, weighted_values)
from minqkv.model import GPT, GPTConfig
from minqkv.optim import AdamW
from minqkv.tensor import Tensor, no_grad
from minqkv.lab.variant_checks import check_variant, variant_cases
from minqkv.lab.variants import variant_rows

C, H = 16, 4  # width and heads of the small layers below
SYMMETRIC_CODES = {"aab", "aaa", "--a", "aa-", "---"}


def spec(code: str = "abc", **sizes) -> AttentionSpec:
    """One layer's AttentionSpec, C wide with H heads unless sizes say otherwise."""
    return GPTConfig(**{"n_embd": C, "n_head": H, "n_layer": 1, "code": code, **sizes}).attention_spec(0)


def perturbed_attention(layer: AttentionSpec, seed: int = 0) -> CausalSelfAttention:
    """A float64 layer whose every parameter (rotation and position bias too) is random."""
    attn = CausalSelfAttention(layer, dtype=np.float64, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 100)
    for _, p in attn.named_parameters():
        p.data += 0.3 * rng.standard_normal(p.shape)
    return attn


def random_input(T: int = 6, seed: int = 1) -> Tensor:
    return Tensor(np.random.default_rng(seed).standard_normal((2, T, C)))


def max_asymmetry(scores: np.ndarray) -> float:
    return float(np.abs(scores - np.swapaxes(scores, -1, -2)).max())


def scores_of(attn: CausalSelfAttention, x: Tensor) -> np.ndarray:
    """The layer's scores (B, H, T, T) before mask and softmax, from its own q and k."""
    with no_grad():
        q, k, _ = attn.project(x)
        return scores_and_weights(q, k, attn.score_bias(0, x.shape[1]))[0].data


def heads(x: np.ndarray, n: int = H) -> np.ndarray:
    """(B, T, n*hd) -> (B, n, T, hd), written out independently of the layer."""
    B, T, width = x.shape
    return x.reshape(B, T, n, width // n).transpose(0, 2, 1, 3)


# ---- the grammar of codes --------------------------------------------------------------------


def test_there_are_exactly_the_15_codes_of_the_design_table():
    table = {"abc", "aab", "abb", "aba", "aaa", "-ab", "a-b", "ab-",
             "-aa", "a-a", "aa-", "--a", "-a-", "a--", "---"}
    assert len(ALL_CODES) == 15
    assert set(ALL_CODES) == table


def test_every_spelling_of_three_letters_or_dashes_is_one_of_the_15_codes():
    for spelling in itertools.product("abc-", repeat=3):
        assert parse_code("".join(spelling)) in ALL_CODES


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_code_parses_to_itself(code):
    assert parse_code(code) == code


@pytest.mark.parametrize("name, code", [
    ("canonical", "abc"), ("shared-qk", "aab"), ("shared-kv", "abb"), ("shared-qv", "aba"),
    ("single", "aaa"), ("shared-qkv", "aaa"), ("no-query", "-ab"), ("identity-query", "-ab"),
    ("no-key", "a-b"), ("identity-key", "a-b"), ("no-value", "ab-"), ("identity-value", "ab-"),
    ("value-only", "--a"), ("none", "---"),
])
def test_every_name_resolves_to_its_code(name, code):
    assert parse_code(name) == code


@pytest.mark.parametrize("role", ["query", "key", "value"])
def test_no_x_and_identity_x_name_the_code_whose_role_x_is_the_identity(role):
    for prefix in ("no-", "identity-"):
        code = parse_code(prefix + role)
        assert code["qkv".index(role[0])] == "-"
        assert code.count("-") == 1


def test_shared_qk_is_not_called_no_key():
    assert "no-key" not in names_of("aab")


def test_aliases_ignore_case_and_surrounding_spaces():
    assert parse_code("  Shared-KV ") == "abb"


@pytest.mark.parametrize("spelling, code", [("bab", "aba"), ("cc-", "aa-"), ("cba", "abc"),
                                            ("b-b", "a-a"), ("-cb", "-ab"), ("bbb", "aaa")])
def test_letters_are_renamed_in_order_of_first_appearance(spelling, code):
    assert parse_code(spelling) == code


@pytest.mark.parametrize("bad", ["abd", "ab", "abcd", "xyz", "", "shared", "a b"])
def test_invalid_code_raises_and_lists_the_valid_codes(bad):
    with pytest.raises(ValueError) as info:
        parse_code(bad)
    message = str(info.value)
    assert repr(bad) in message
    for code in ALL_CODES:
        assert code in message
    assert "shared-kv" in message


def test_a_code_that_is_not_a_string_raises_type_error():
    with pytest.raises(TypeError, match="string"):
        parse_code(3)


# ---- codes the heads cannot take ------------------------------------------------------------


@pytest.mark.parametrize("code", ["aab", "aba", "aaa"])
def test_query_cannot_share_a_weight_with_narrower_grouped_keys_or_values(code):
    with pytest.raises(ValueError, match="cannot share one weight"):
        spec(code=code, n_embd=C, n_head=H, n_kv_head=2)


@pytest.mark.parametrize("code, role", [("a-b", "K"), ("ab-", "V"), ("--a", "K"), ("---", "K")])
def test_identity_key_or_value_needs_all_heads(code, role):
    with pytest.raises(ValueError, match=f"identity {role}"):
        spec(code=code, n_embd=C, n_head=H, n_kv_head=1)


@pytest.mark.parametrize("code", ["abc", "abb", "-ab", "-aa"])
def test_grouped_query_attention_accepts_untied_query(code):
    layer = spec(code=code, n_embd=C, n_head=H, n_kv_head=1)
    assert layer.width("k") == layer.width("v") == C // H


def test_n_kv_head_must_divide_n_head():
    with pytest.raises(ValueError, match="must divide n_head"):
        spec(code="abc", n_embd=C, n_head=H, n_kv_head=3)


def test_n_embd_must_be_a_multiple_of_n_head():
    with pytest.raises(ValueError, match="multiple of n_head"):
        spec(code="abc", n_embd=10, n_head=4)


# ---- parameter counts ------------------------------------------------------------------------


def specs_with_modifiers():
    """Every code under every modifier it accepts, as GPTConfig keyword sets."""
    modifiers = [{}, dict(rotate=True), dict(pos2d=True), dict(gate=True), dict(out_proj=False),
                 dict(n_kv_head=2), dict(n_kv_head=1),
                 dict(rotate=True, pos2d=True, gate=True, n_kv_head=2, out_proj=False),
                 dict(pos="rope"), dict(out_gate=True), dict(latent_kv=6), dict(latent_kv=6, n_kv_head=1),
                 dict(latent_kv=6, gate=True, out_gate=True, pos="rope", rotate=True, n_kv_head=2)]
    cases = []
    for code, mods in itertools.product(ALL_CODES, modifiers):
        try:
            spec(code=code, n_embd=C, n_head=H, block_size=8, **mods)
        except ValueError:
            continue
        cases.append(pytest.param(code, mods, id=code + "".join(f"+{k}={v}" for k, v in mods.items())))
    return cases


@pytest.mark.parametrize("code, modifiers", specs_with_modifiers())
def test_params_counts_the_layers_actual_parameters(code, modifiers):
    layer = spec(code=code, n_embd=C, n_head=H, block_size=8, **modifiers)
    attn = CausalSelfAttention(layer)
    assert layer.params() == attn.num_parameters()


@pytest.mark.parametrize("code, out_proj, squares", [
    ("abc", True, 4), ("abc", False, 3), ("abb", True, 3), ("aab", True, 3), ("aaa", True, 2),
    ("-ab", True, 3), ("--a", True, 2), ("---", True, 1), ("---", False, 0),
])
def test_params_is_a_tied_weight_once_and_identity_free(code, out_proj, squares):
    assert spec(code=code, n_embd=C, n_head=H, out_proj=out_proj).params() == squares * C * C


def test_params_of_multi_query_attention_has_one_narrow_key_and_value():
    hd = C // H
    assert spec(code="abc", n_embd=C, n_head=H, n_kv_head=1).params() == 2 * C * C + 2 * C * hd


def test_params_of_modifiers_rotation_position_bias_and_gates():
    base = spec(code="abc", n_embd=C, n_head=H, block_size=8).params()
    hd = C // H
    assert spec(code="abc", n_embd=C, n_head=H, block_size=8, rotate=True).params() == base + H * hd * hd
    assert spec(code="abc", n_embd=C, n_head=H, block_size=8, pos2d=True).params() == base + H * 64
    assert spec(code="abc", n_embd=C, n_head=H, block_size=8, gate=True).params() == base + 3


@pytest.mark.parametrize("code, matrices_saved", [("abb", 1), ("aab", 1), ("-ab", 1), ("aaa", 2),
                                                   ("--a", 2), ("---", 3)])
def test_flops_drop_by_one_projection_for_each_matrix_saved(code, matrices_saved):
    canonical = spec(code="abc", n_embd=C, n_head=H).flops_per_token()
    flops = spec(code=code, n_embd=C, n_head=H).flops_per_token()
    assert canonical - flops == matrices_saved * 2 * C * C


# ---- attend: the attention every variant shares ----------------------------------------------


def random_qkv(T: int, Tk: int, Hkv: int = H, B: int = 2, hd: int = 3) -> tuple:
    """q (B, H, T, hd), k and v (B, Hkv, Tk, hd) of random numbers."""
    rng = np.random.default_rng(0)
    return (Tensor(rng.standard_normal((B, H, T, hd))), Tensor(rng.standard_normal((B, Hkv, Tk, hd))),
            Tensor(rng.standard_normal((B, Hkv, Tk, hd))))


def loop_attention(q, k, v) -> np.ndarray:
    """Causal attention one query at a time: q (B, H, T, hd), k and v (B, H, Tk, hd) -> (B, T, H*hd)."""
    B, Hq, T, hd = q.shape
    offset = k.shape[2] - T
    y = np.zeros((B, T, Hq, hd))
    for b, h, i in itertools.product(range(B), range(Hq), range(T)):
        seen = slice(0, offset + i + 1)
        s = k[b, h, seen] @ q[b, h, i] / math.sqrt(hd)  # (offset + i + 1,)
        w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        y[b, i, h] = w @ v[b, h, seen]
    return y.reshape(B, T, Hq * hd)


@pytest.mark.parametrize("T, Tk", [(5, 5), (2, 5), (1, 4)], ids=["full", "2-new-after-3-cached", "1-new"])
def test_attend_equals_causal_attention_written_one_query_at_a_time(T, Tk):
    q, k, v = random_qkv(T, Tk)  # the T queries are the last T of Tk positions
    y = attend(q, k, v)
    np.testing.assert_allclose(y.data, loop_attention(q.data, k.data, v.data), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T, Tk", [(5, 5), (2, 5), (1, 4)], ids=["full", "2-new-after-3-cached", "1-new"])
def test_the_weighted_values_of_the_step_by_step_weights_are_causal_attention_one_query_at_a_time(T, Tk):
    q, k, v = random_qkv(T, Tk)
    y = weighted_values(scores_and_weights(q, k)[1], v)  # (B, T, H*hd)
    np.testing.assert_allclose(y.data, loop_attention(q.data, k.data, v.data), rtol=1e-12, atol=1e-12)


def test_attend_merges_the_heads_of_the_fused_kernels_output_without_a_copy(monkeypatch):
    from minqkv import kernels

    outputs = []
    fused = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *args, **kw: outputs.append(fused(*args, **kw)) or outputs[-1])
    y = attend(*random_qkv(5, 5))  # (B, T, H*hd)
    assert np.shares_memory(y.data, outputs[0][0])


def test_grouped_key_heads_attend_like_each_key_head_repeated_for_its_group():
    Hkv = 2
    q, k, v = random_qkv(5, 5, Hkv)
    # query head h reads key head h // 2
    repeated = [Tensor(np.repeat(t.data, H // Hkv, axis=1)) for t in (k, v)]
    np.testing.assert_allclose(attend(q, k, v).data, attend(q, *repeated).data, rtol=1e-13, atol=1e-13)
    for grouped, full in zip(scores_and_weights(q, k), scores_and_weights(q, repeated[0])):
        np.testing.assert_allclose(grouped.data, full.data, rtol=1e-13, atol=1e-13)
    weights = scores_and_weights(q, k)[1]
    np.testing.assert_allclose(weighted_values(weights, v).data, attend(q, k, v).data, rtol=1e-13, atol=1e-13)


def test_scores_are_before_the_mask_and_weights_causal_after_the_softmax():
    q, k, v = random_qkv(4, 4)
    scores, weights = scores_and_weights(q, k)
    expected = q.data @ np.swapaxes(k.data, -1, -2) / math.sqrt(3)  # (B, H, T, T), nothing masked
    np.testing.assert_allclose(scores.data, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weights.data.sum(-1), 1.0, rtol=1e-12)
    assert np.all(np.triu(weights.data, k=1) == 0)


# ---- project: the variant --------------------------------------------------------------------


@pytest.mark.parametrize("code, same", [("abb", "kv"), ("aab", "qk"), ("aba", "qv"), ("aaa", "qkv")])
def test_roles_with_one_letter_get_one_tensor(code, same):
    q, k, v = perturbed_attention(spec(code)).project(random_input())
    tensors = dict(zip("qkv", (q.data, k.data, v.data)))
    for a, b in itertools.combinations(same, 2):
        assert np.array_equal(tensors[a], tensors[b])
    other = next(iter(set("qkv") - set(same)), None)
    if other:
        assert not np.allclose(tensors[other], tensors[same[0]])


@pytest.mark.parametrize("code", ["-ab", "a-b", "ab-", "---"])
def test_an_identity_role_is_the_input_split_into_heads(code):
    x = random_input()
    projected = dict(zip("qkv", perturbed_attention(spec(code)).project(x)))
    for role, letter in zip("qkv", code):
        assert np.array_equal(projected[role].data, heads(x.data)) == (letter == "-")


# ---- KV cache size ---------------------------------------------------------------------------


def test_shared_kv_caches_half_of_canonical():
    abc = spec(code="abc", n_embd=C, n_head=H).kv_cache_floats_per_token()
    abb = spec(code="abb", n_embd=C, n_head=H).kv_cache_floats_per_token()
    assert abc == 2 * C
    assert abb * 2 == abc


@pytest.mark.parametrize("code, floats", [("---", C), ("a--", C), ("-aa", C), ("--a", 2 * C),
                                          ("aaa", C), ("aab", 2 * C)])
def test_a_tensor_serving_as_key_and_value_is_cached_once(code, floats):
    assert spec(code=code, n_embd=C, n_head=H).kv_cache_floats_per_token() == floats


def test_multi_query_caches_one_head_of_keys_and_values():
    hd = C // H
    assert spec(code="abc", n_embd=C, n_head=H, n_kv_head=1).kv_cache_floats_per_token() == 2 * hd
    assert spec(code="abb", n_embd=C, n_head=H, n_kv_head=1).kv_cache_floats_per_token() == hd


def test_an_empty_cache_stores_nothing():
    assert KVCache().floats_per_token() == 0


def test_the_cache_grows_by_doubling_and_every_view_it_handed_out_keeps_its_tokens():
    rng = np.random.default_rng(0)
    cache, keys, values, handed_out, buffers = KVCache(), [], [], [], set()
    for step in range(40):
        k_new, v_new = rng.standard_normal((2, 1 + step % 3, 3)), rng.standard_normal((2, 1 + step % 3, 5))
        keys.append(k_new), values.append(v_new)
        handed_out.append(cache.append(k_new, v_new))
        buffers.add(id(cache._k))
    assert cache.length == sum(k.shape[1] for k in keys) == 79
    assert len(buffers) <= math.ceil(math.log2(79)) + 1  # copies of the past: O(log n), not one per step
    for step, (k_view, v_view) in enumerate(handed_out):
        np.testing.assert_array_equal(k_view, np.concatenate(keys[:step + 1], axis=1))
        np.testing.assert_array_equal(v_view, np.concatenate(values[:step + 1], axis=1))
    assert cache.floats_per_token() == 3 + 5


@pytest.mark.parametrize("label", list(ALL_CODES) + ["abb+gate", "aaa+gate", "abb+rotate", "abc+gqa2",
                                                     "abb+mqa", "-aa+mqa", "abb+gate+gqa2",
                                                     "abc+rope", "abb+rope", "---+rope", "-aa+rope+mqa",
                                                     "abb+rotate+rope", "abc+out-gate", "abc+latent-kv5",
                                                     "abb+rope+latent-kv3", "-ab+latent-kv4+mqa"])
def test_measured_cache_after_decoding_matches_the_formula(label):
    overrides = GPTConfig.overrides_from_label(label)
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=H, n_embd=C, **overrides))
    caches = model.new_caches()
    with no_grad():
        model(np.array([[1, 2, 3]]), caches=caches)
        model(np.array([[4]]), caches=caches)
    assert caches[0].length == 4
    assert caches[0].floats_per_token() == model.blocks[0].attn.spec.kv_cache_floats_per_token()


# ---- symmetry of the scores ------------------------------------------------------------------


def test_symmetric_codes_are_those_whose_query_and_key_are_one_tensor():
    symmetric = {code for code in ALL_CODES if spec(code=code).symmetric()}
    assert symmetric == SYMMETRIC_CODES


@pytest.mark.parametrize("label", list(ALL_CODES) + ["aaa+rotate", "aab+rotate", "--a+rotate",
                                                     "aaa+pos2d", "aab+pos2d", "---+pos2d",
                                                     "aab+rope", "aaa+rope", "---+rope", "abc+rope",
                                                     "aab+rotate+rope", "abc+latent-kv8"])
def test_scores_are_symmetric_exactly_when_the_variant_says_so(label):
    layer = spec(block_size=8, **GPTConfig.overrides_from_label(label))
    scores = scores_of(perturbed_attention(layer), random_input())  # (B, H, T, T)
    assert scores.shape == (2, H, 6, 6)
    if layer.symmetric():
        assert max_asymmetry(scores) < 1e-12
    else:
        assert max_asymmetry(scores) > 1e-3


# ---- the learned rotation --------------------------------------------------------------------


def test_rotation_starts_at_the_identity():
    attn = CausalSelfAttention(spec(code="aaa", n_embd=C, n_head=H, rotate=True), dtype=np.float64)
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
        model = GPT(GPTConfig(vocab_size=6, block_size=8, n_layer=1, n_head=2, n_embd=8, code=code,
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
    assert max_asymmetry(scores_of(attn, x)) > 1e-4


# ---- gates and the position bias -------------------------------------------------------------


def deterministic_gate(log_alpha: float) -> float:
    """clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1) with gamma = -0.1, zeta = 1.1."""
    return min(1.0, max(0.0, 1.2 / (1 + np.exp(-log_alpha)) - 0.1))


def test_gate_mixes_projection_with_identity():
    attn = perturbed_attention(spec(code="abc", n_embd=C, n_head=H, gate=True)).eval()
    attn.gate_q.data[:] = 0.3
    x = random_input()
    g = deterministic_gate(0.3)
    expected = g * (x.data @ attn.w_q.data) + (1 - g) * x.data  # out = g xW + (1-g) x
    q, _, _ = attn.project(x)
    np.testing.assert_allclose(q.data, heads(expected), rtol=1e-13, atol=1e-13)


def test_a_sampled_gate_follows_the_stretched_logistic_formula():
    log_alpha, u = 0.7, np.array([0.3])
    s = 1 / (1 + np.exp(-(np.log(u / (1 - u)) + log_alpha) / (2 / 3)))
    z = hard_concrete(Tensor(np.array([log_alpha])), u)
    np.testing.assert_allclose(z.data, np.clip(s * 1.2 - 0.1, 0, 1), rtol=1e-14)


def test_a_training_layer_draws_fresh_gate_noise_and_an_evaluating_one_none():
    attn = perturbed_attention(spec(code="abc", n_embd=C, n_head=H, gate=True))
    attn.gate_rng = np.random.default_rng(5)
    attn.gate_q.data[:] = 0.0  # undecided: every draw gives another z
    x = random_input()
    first, second = attn.project(x)[0].data, attn.project(x)[0].data
    assert not np.allclose(first, second)
    attn.eval()
    state = attn.gate_rng.bit_generator.state
    assert np.array_equal(attn.project(x)[0].data, attn.project(x)[0].data)
    assert attn.gate_rng.bit_generator.state == state


def test_hard_concrete_gates_are_exactly_zero_or_one_in_most_noisy_draws_far_from_zero():
    noise = np.random.default_rng(0).uniform(1e-6, 1, size=1000)
    z = hard_concrete(Tensor(np.full(1000, 3.0)), noise).data
    assert 0.7 < np.mean(z == 1.0) < 1.0
    assert np.all((z >= 0) & (z <= 1))


def test_a_gated_role_applies_its_folded_weight():
    attn = perturbed_attention(spec(code="aab", gate=True)).eval()
    attn.gate_k.data[:] = -0.7
    x = random_input()
    _, k, _ = attn.project(x)
    np.testing.assert_allclose(k.data, heads(x.data @ attn.folded_weight("k")), rtol=1e-12, atol=1e-12)


def test_gates_start_open_and_equal_so_a_gated_model_first_learns_as_the_plain_one():
    attn = CausalSelfAttention(spec(code="abc", n_embd=C, n_head=H, gate=True))
    assert {attn.gate_value(role) for role in "qkv"} == {1.0}


def test_only_full_width_projections_are_gated():
    assert spec(code="abc", n_embd=C, n_head=H, gate=True).gated_roles() == "qkv"
    assert spec(code="-ab", n_embd=C, n_head=H, gate=True).gated_roles() == "kv"
    assert spec(code="abb", n_embd=C, n_head=H, n_kv_head=2, gate=True).gated_roles() == "q"
    assert spec(code="abc", n_embd=C, n_head=H).gated_roles() == ""


@pytest.mark.parametrize("code, sizes, reason", [
    ("---", {}, "Q is the identity, K is the identity, V is the identity"),
    ("-ab", dict(n_kv_head=1), "K is 4 wide (n_kv_head=1), x 16"),
    ("-ab", dict(latent_kv=8), "K is up-projected from the latent (latent_kv=8)"),
])
def test_a_gated_layer_with_nothing_to_gate_is_refused_with_the_reason(code, sizes, reason):
    with pytest.raises(ValueError, match=f"code '{code}' has nothing to gate") as info:
        spec(code=code, gate=True, **sizes)
    assert reason in str(info.value)


def test_the_variant_table_says_which_codes_have_nothing_to_gate():
    rows = {row["code"]: row for row in variant_rows(gate=True)}
    assert "nothing to gate" in rows["---"]["error"]
    assert "error" not in rows["--a"] and "error" not in rows["a--"]


def test_position_bias_starts_at_zero_for_every_head_and_position_pair():
    attn = CausalSelfAttention(spec(code="aab", n_embd=C, n_head=H, block_size=8, pos2d=True))
    assert attn.pos_bias.shape == (H, 8, 8)
    assert not attn.pos_bias.data.any()


# ---- exact gradients for every variant -------------------------------------------------------


def test_variant_cases_cover_every_code_and_each_modifier():
    labels = [label for label, _ in variant_cases("all")]
    assert labels[:15] == list(ALL_CODES)
    for modifier in ("rotate", "pos2d", "gate", "gqa2", "mqa", "no-out-proj", "rope", "no-pos", "out-gate",
                     "latent-kv4"):
        assert any(label.endswith("+" + modifier) for label in labels), modifier


def test_variant_cases_of_one_code_add_its_modifier_cases():
    labels = [label for label, _ in variant_cases("shared-kv")]
    assert labels == ["abb", "abb+gqa2", "abb+mqa", "abb+rotate+mqa", "abb+rope", "abb+rope+gqa2",
                      "abb+out-gate+mqa", "abb+latent-kv4", "abb+rope+latent-kv4+mqa", "abb+window3+gqa2",
                      "abb+linear+mqa", "abb+out-gate+performer4+gqa2"]


@pytest.mark.parametrize("label, overrides", variant_cases("all"), ids=[c[0] for c in variant_cases("all")])
def test_variant_gradients_match_finite_differences(label, overrides):
    result = check_variant(label, overrides)
    assert result.passed, f"{label}: max relative error {result.max_rel_err:.2e}"
    assert result.max_rel_err < 1e-6


def test_attention_takes_its_dtype_from_the_config_unless_told():
    config = GPTConfig(code="abb", n_embd=8, n_head=2, n_layer=1, dtype="float64")
    assert CausalSelfAttention(config.attention_spec(0)).w_q.dtype == np.float64
    assert CausalSelfAttention(config.attention_spec(0), dtype=np.float32).w_q.dtype == np.float32


@pytest.mark.parametrize("n_kv_head, with_bias, T, Tk", [(4, False, 6, 6), (2, True, 6, 6), (1, True, 3, 7)])
def test_attend_is_the_step_by_step_attention_in_one_fused_kernel_with_the_same_values_and_gradients(
        n_kv_head, with_bias, T, Tk):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape) for shape in [(2, 4, T, 8), (2, n_kv_head, Tk, 8), (2, n_kv_head, Tk, 8)]]
    if with_bias:
        inputs.append(rng.standard_normal((4, T, Tk)))

    def step_by_step(q, k, v, bias=None):
        return weighted_values(scores_and_weights(q, k, bias)[1], v)

    results = []
    for attention in (step_by_step, attend):
        tensors = [Tensor(x, requires_grad=True) for x in inputs]
        y = attention(*tensors)
        (y * Tensor((np.arange(y.data.size).reshape(y.shape) % 7).astype(float))).sum().backward()
        results.append([y.data] + [t.grad for t in tensors])
    for fused, reference in zip(results[1], results[0]):
        np.testing.assert_allclose(fused, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p, training, fused_calls", [(0.5, True, 0), (0.5, False, 1), (0.0, True, 1)],
                         ids=["dropout-active", "evaluation", "p-zero"])
def test_attend_runs_the_fused_kernel_unless_dropout_is_active(monkeypatch, p, training, fused_calls):
    from minqkv import kernels
    from minqkv.nn import Dropout

    calls = []
    fused = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *args, **kw: calls.append(1) or fused(*args, **kw))
    rng = np.random.default_rng(0)
    q = k = v = Tensor(rng.standard_normal((1, 2, 4, 8)))
    attend(q, k, v, dropout=Dropout(p, rng).train(training))
    assert len(calls) == fused_calls


def test_attend_with_active_dropout_drops_the_step_by_step_weights():
    from minqkv.nn import Dropout

    q, k, v = random_qkv(5, 5)
    weights = scores_and_weights(q, k)[1]  # (B, H, T, T)
    y = attend(q, k, v, dropout=Dropout(0.5, np.random.default_rng(3)))
    dropped = Dropout(0.5, np.random.default_rng(3))(weights)  # the same draws
    np.testing.assert_allclose(y.data, weighted_values(dropped, v).data, rtol=1e-13, atol=1e-13)
