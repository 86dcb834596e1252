"""Specification of the modifiers of today's models: rotary positions (and none at all), output
gates per head, and latent keys and values; what they compute, cache and cost, and what the
analysis and the ablation bench report about them."""

import math

import numpy as np
import pytest

from minqkv.lab.ablate import SWEEP_PRESETS, plan_sweep
from minqkv.lab.analysis import analyze_model, describe_out_gates, format_report, sink_mass, uniform_sink_mass
from minqkv.attention import CausalSelfAttention, KVCache, attend, rope, scores_and_weights
from minqkv.checkpoint import load_model, save_checkpoint
from minqkv.data import CharTokenizer
from minqkv.model import GPT, GPTConfig
from minqkv.optim import AdamW
from minqkv.tensor import Tensor, no_grad
from minqkv.lab.variants import variant_rows

C, H = 16, 4
VOCAB, BLOCK = 7, 8


def layer(label: str = "abc", seed: int = 0, **sizes) -> CausalSelfAttention:
    """A float64 layer of a labelled variant, C wide with H heads, every parameter moved off its init."""
    config = GPTConfig(**{"n_embd": C, "n_head": H, "n_layer": 1, "block_size": BLOCK, "dtype": "float64",
                          **GPTConfig.overrides_from_label(label), **sizes})
    attn = CausalSelfAttention(config.attention_spec(0), rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 100)
    for _, p in attn.named_parameters():
        p.data += 0.3 * rng.standard_normal(p.shape)
    return attn.eval()


def random_input(T: int = 6, seed: int = 1) -> Tensor:
    return Tensor(np.random.default_rng(seed).standard_normal((2, T, C)))


def heads(x: np.ndarray, n: int = H) -> np.ndarray:
    """(B, T, n*hd) -> (B, n, T, hd)."""
    B, T, width = x.shape
    return x.reshape(B, T, n, width // n).transpose(0, 2, 1, 3)


def scores_of(attn: CausalSelfAttention, x: Tensor) -> np.ndarray:
    with no_grad():
        q, k, _ = attn.project(x)
        return scores_and_weights(q, k, attn.score_bias(0, x.shape[1]))[0].data  # (B, H, T, T)


def rotation_matrix(p: int, hd: int) -> np.ndarray:
    """R_p (hd, hd): the row-vector rotation that rope applies at position p, read off the identity."""
    eye = Tensor(np.eye(hd)[None])  # (1, hd, hd): hd 'tokens' at position p, one head
    return rope(eye, np.full(hd, p), hd).data[0]


def gpt(label: str, seed: int = 0, **sizes) -> GPT:
    config = GPTConfig(**{"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 2, "n_head": 2, "n_embd": 8,
                          "dtype": "float64", **GPTConfig.overrides_from_label(label), **sizes})
    model = GPT(config)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p.data += 0.3 * rng.standard_normal(p.shape)
    return model.eval()


# ---- rotary positions ----------------------------------------------------------------------------


def test_rope_turns_each_pair_as_a_complex_number_times_e_to_the_i_position_theta():
    B, T, n, hd = 2, 5, 2, 8
    t = np.random.default_rng(0).standard_normal((B, T, n * hd))
    positions = np.array([0, 1, 2, 7, 30])
    turned = rope(Tensor(t), positions, hd).data
    z = t.reshape(B, T, n, hd // 2, 2) @ np.array([1, 1j])  # (B, T, n, hd/2): a + ib
    theta = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    expected = z * np.exp(1j * positions[:, None, None] * theta)  # (T, 1, hd/2) broadcast
    expected = np.stack([expected.real, expected.imag], axis=-1).reshape(B, T, n * hd)
    np.testing.assert_allclose(turned, expected, rtol=1e-12, atol=1e-12)


def test_rope_at_position_zero_leaves_vectors_as_they_are_and_never_changes_a_length():
    t = np.random.default_rng(0).standard_normal((1, 4, 8))
    np.testing.assert_array_equal(rope(Tensor(t), np.zeros(4, int), 4).data, t)
    turned = rope(Tensor(t), np.arange(4) * 11, 4).data
    np.testing.assert_allclose(np.linalg.norm(turned.reshape(1, 4, 2, 4), axis=-1),
                               np.linalg.norm(t.reshape(1, 4, 2, 4), axis=-1), rtol=1e-12)


def test_rope_scores_depend_only_on_the_offset_between_query_and_key():
    rng = np.random.default_rng(0)
    q, k = (Tensor(rng.standard_normal((1, 6, 8))) for _ in range(2))

    def scores(start):
        positions = np.arange(start, start + 6)
        return heads(rope(q, positions, 4).data, 2) @ np.swapaxes(heads(rope(k, positions, 4).data, 2), -1, -2)

    np.testing.assert_allclose(scores(0), scores(17), rtol=1e-10, atol=1e-12)
    assert not np.allclose(scores(0), heads(q.data, 2) @ np.swapaxes(heads(k.data, 2), -1, -2))


def test_the_relative_rotation_is_not_symmetric_but_transposes_to_the_opposite_offset():
    hd = 8
    for n, m in [(5, 2), (3, 7)]:
        R_n, R_m = rotation_matrix(n, hd), rotation_matrix(m, hd)
        relative = rotation_matrix(n - m, hd)
        np.testing.assert_allclose(R_n @ R_m.T, relative, atol=1e-12)  # R_n R_m^T = R_n-m
        assert np.abs(relative - relative.T).max() > 0.1  # not symmetric ...
        np.testing.assert_allclose(relative.T, rotation_matrix(m - n, hd), atol=1e-12)  # ... R_n-m^T = R_m-n


def test_tied_query_and_key_scores_stay_symmetric_under_rope_as_u_n_R_n_minus_m_u_m():
    """s(n, m) = u_n R_n-m u_m^T, and s(m, n) = u_m R_m-n u_n^T = u_n R_n-m u_m^T = s(n, m)."""
    attn = layer("aab+rope")
    x = random_input()
    scores = scores_of(attn, x)  # (B, H, T, T)
    assert np.abs(scores - np.swapaxes(scores, -1, -2)).max() < 1e-12
    hd = C // H
    u = heads(x.data @ attn.w_qk.data)  # (B, H, T, hd): the one tensor that is both Q and K, unturned
    T = x.shape[1]
    expected = np.array([[np.einsum("bhd,de,bhe->bh", u[:, :, n], rotation_matrix(n - m, hd), u[:, :, m])
                          for m in range(T)] for n in range(T)])  # (T, T, B, H)
    np.testing.assert_allclose(scores, expected.transpose(2, 3, 0, 1) / math.sqrt(hd), rtol=1e-10, atol=1e-12)
    plain = scores_of(layer("aab"), x)
    assert np.abs(scores - plain).max() > 1e-3  # the positions did change the scores


def test_untied_query_and_key_under_rope_give_asymmetric_scores():
    scores = scores_of(layer("abc+rope"), random_input())
    assert np.abs(scores - np.swapaxes(scores, -1, -2)).max() > 1e-3
    assert layer("aab+rope").spec.symmetric() and not layer("abc+rope").spec.symmetric()


def test_an_identity_query_is_turned_by_rope_too():
    attn = layer("-ab+rope")
    x = random_input()
    with no_grad():
        q, _, _ = attn.project(x)
    np.testing.assert_allclose(q.data, heads(rope(x, np.arange(6), C // H).data), rtol=1e-12)


def test_rope_and_no_positions_have_no_position_table_and_the_cost_table_knows():
    sizes = dict(n_embd=C, n_head=H, block_size=BLOCK, n_layer=2, vocab_size=VOCAB, mlp_hidden=4 * C)
    learned = GPT(GPTConfig(**{k: v for k, v in sizes.items() if k != "mlp_hidden"}))
    for pos in ("learned", "rope", "none"):
        model = GPT(GPTConfig(**{k: v for k, v in sizes.items() if k != "mlp_hidden"}, pos=pos))
        row = next(r for r in variant_rows(codes=["abc"], pos=pos, **sizes))
        assert row["model_params"] == model.num_parameters()
        dropped = 0 if pos == "learned" else BLOCK * C
        assert model.num_parameters() == learned.num_parameters() - dropped


def test_without_positions_a_one_layer_model_reads_the_past_as_a_set():
    """No positions and a causal mask: the last token's output cannot tell the order of the tokens before it."""
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    shuffled = np.array([[5, 3, 1, 4, 2, 6]])  # the same first five tokens in another order, then 6
    for label, invariant in [("abc+no-pos", True), ("abc+rope", False), ("abc", False)]:
        model = gpt(label, n_layer=1)
        with no_grad():
            last = model(ids)[0].data[0, -1], model(shuffled)[0].data[0, -1]
        assert np.allclose(*last, rtol=0, atol=1e-12) == invariant, label


# ---- the KV cache under rotary positions and latents --------------------------------------------


def test_shared_kv_under_rope_caches_turned_keys_and_plain_values_apart():
    attn = layer("abb+rope")
    assert attn.spec.kv_cache_floats_per_token() == 2 * C == layer("abc").spec.kv_cache_floats_per_token()
    x = random_input()
    cache = KVCache()
    with no_grad():
        attn(x, cache)
    projected = x.data @ attn.w_kv.data  # (B, T, C): the one tensor that is K and V before positions
    np.testing.assert_allclose(cache.k_source, rope(Tensor(projected), np.arange(6), C // H).data, rtol=1e-12)
    np.testing.assert_allclose(cache.v_source, projected, rtol=1e-12)
    assert cache.floats_per_token() == 2 * C


def test_shared_kv_keeps_one_cached_tensor_with_learned_positions_and_with_none():
    for label in ("abb", "abb+no-pos"):
        assert layer(label).spec.kv_cache_floats_per_token() == C


def test_a_latent_layer_caches_only_its_latent_whatever_its_heads():
    R = 5
    for label in (f"abc+latent-kv{R}", f"abb+latent-kv{R}+mqa", f"abc+rope+latent-kv{R}+gqa2"):
        attn = layer(label)
        x = random_input()
        cache = KVCache()
        with no_grad():
            attn(x, cache)
        assert cache.v_source is None
        np.testing.assert_allclose(cache.k_source, x.data @ attn.w_kv_down.data, rtol=1e-12)
        assert cache.floats_per_token() == attn.spec.kv_cache_floats_per_token() == R


# ---- output gates --------------------------------------------------------------------------------


def test_output_gates_start_at_one_half_for_every_head_and_token():
    attn = CausalSelfAttention(GPTConfig(n_embd=C, n_head=H, n_layer=1, out_gate=True).attention_spec(0))
    with no_grad():
        gates = attn.out_gates(Tensor(np.random.default_rng(0).standard_normal((2, 5, C)).astype(np.float32)))
    assert gates.shape == (2, 5, H)
    assert np.all(gates.data == 0.5)


def test_an_output_gate_scales_its_heads_whole_output_before_the_output_projection():
    attn = layer("abc+out-gate")
    x = random_input()
    with no_grad():
        y = attn(x).data
        q, k, v = attn.project(x)
        plain = attend(q, k, v)  # (B, T, C)
    gates = 1 / (1 + np.exp(-(x.data @ attn.w_out_gate.data)))  # (B, T, H)
    gated = plain.data.reshape(2, 6, H, C // H) * gates[..., None]
    np.testing.assert_allclose(y, gated.reshape(2, 6, C) @ attn.w_o.data, rtol=1e-12, atol=1e-12)


def test_output_gates_cost_one_weight_per_input_channel_and_head():
    plain, gated = layer("abc").spec, layer("abc+out-gate").spec
    assert gated.params() - plain.params() == C * H
    assert gated.flops_per_token() - plain.flops_per_token() == 2 * C * H + C
    assert gated.kv_cache_floats_per_token() == plain.kv_cache_floats_per_token()


# ---- latent keys and values ----------------------------------------------------------------------


def test_latent_keys_and_values_are_two_up_projections_of_one_latent():
    attn = layer("abc+latent-kv6")
    x = random_input()
    with no_grad():
        q, k, v = attn.project(x)
    c = x.data @ attn.w_kv_down.data  # (B, T, R)
    np.testing.assert_allclose(q.data, heads(x.data @ attn.w_q.data), rtol=1e-12)
    np.testing.assert_allclose(k.data, heads(c @ attn.w_k_up.data), rtol=1e-12)
    np.testing.assert_allclose(v.data, heads(c @ attn.w_v_up.data), rtol=1e-12)


def test_a_latent_shared_kv_layer_has_one_up_projection_for_keys_and_values():
    attn = layer("abb+latent-kv6")
    with no_grad():
        _, k, v = attn.project(random_input())
    assert np.array_equal(k.data, v.data)
    assert {name for name, _ in attn.named_parameters()} == {"w_q", "w_kv_down", "w_kv_up", "w_o"}


@pytest.mark.parametrize("label, kv_widths", [("abc", 2), ("abb", 1)])
def test_latent_costs_a_down_projection_and_up_projections_and_caches_r_floats(label, kv_widths):
    R = 6
    spec = layer(f"{label}+latent-kv{R}").spec
    assert spec.params() == C * C + C * R + kv_widths * R * C + C * C  # W_q, W_down, W_up, W_o
    plain = layer(label).spec
    assert spec.flops_per_token() - plain.flops_per_token() == 2 * (C * R + kv_widths * R * C) - 2 * kv_widths * C * C
    assert spec.kv_cache_floats_per_token() == R
    assert not spec.symmetric()


@pytest.mark.parametrize("code, reason", [("aab", "Q shares its weight with K"), ("aba", "Q shares its weight with V"),
                                          ("aaa", "Q shares its weight with K"), ("a-b", "K is the identity"),
                                          ("ab-", "V is the identity"), ("---", "K is the identity")])
def test_latent_keys_and_values_need_learned_keys_and_values_untied_from_the_query(code, reason):
    with pytest.raises(ValueError, match=reason):
        GPTConfig(n_embd=C, n_head=H, code=code, latent_kv=4)


def test_a_gated_latent_layer_gates_only_its_query_and_prunes_to_the_same_logits():
    model = gpt("abc+gate+latent-kv4")
    assert [block.attn.spec.gated_roles() for block in model.blocks] == ["q", "q"]
    model.blocks[0].attn.gate_q.data[:] = -50.0  # shut: layer 0's query becomes x
    pruned = model.prune()
    assert pruned.config.layer_codes[0] == "-ab" and pruned.config.latent_kv == 4
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, BLOCK))
    with no_grad():
        np.testing.assert_allclose(pruned(ids)[0].data, model(ids)[0].data, rtol=1e-12, atol=1e-12)


# ---- checkpoints ---------------------------------------------------------------------------------


def test_a_checkpoint_keeps_positions_output_gates_and_latents(tmp_path):
    model = gpt("abb+rope+out-gate+latent-kv4+mqa")
    meta = {"model_config": model.config.to_dict(), "train_config": {}, "step": 1,
            "tokenizer": CharTokenizer("abcdefg").to_dict()}
    save_checkpoint(tmp_path, model, AdamW(model.named_parameters()), meta)
    loaded, _, _ = load_model(tmp_path)
    assert loaded.config == model.config
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, BLOCK))
    with no_grad():
        np.testing.assert_array_equal(loaded(ids)[0].data, model(ids)[0].data)


# ---- analysis: the attention sink and the output gates -------------------------------------------


def test_sink_mass_is_the_mean_weight_on_position_zero_of_the_queries_after_it():
    T = 4
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]  # row t: 1 / (t + 1) on each visible key
    assert sink_mass(uniform[None, None]) == pytest.approx(uniform_sink_mass(T)) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    all_on_first = np.zeros((T, T))
    all_on_first[:, 0] = 1
    assert sink_mass(all_on_first) == 1.0


def test_output_gates_are_described_by_their_mean_and_the_fraction_below_one_tenth():
    gates = np.array([[[0.05, 0.5], [0.2, 0.09]], [[0.0, 1.0], [0.3, 0.5]]])  # (B, T, H)
    described = describe_out_gates(gates)
    assert described["mean"] == pytest.approx(gates.mean())
    assert described["shut_fraction"] == 3 / 8
    assert described["shut_fraction_per_head"] == [0.5, 0.25]
    assert described["mean_per_head"] == pytest.approx([0.1375, 0.5225])


def test_analysis_reports_the_sink_of_every_model_and_the_output_gates_of_gated_ones():
    batches = [(np.random.default_rng(0).integers(0, VOCAB, (3, BLOCK)), None)]
    plain = analyze_model(gpt("abc"), batches)
    assert all(0 < layer["sink_mass"] < 1 and "out_gates" not in layer for layer in plain["layers"])
    gated_model = gpt("abc+out-gate")
    gated_model.blocks[1].attn.w_out_gate.data[:] = 0.0
    gated_model.blocks[1].attn.w_out_gate.data[0, 1] = -1e3  # head 1 of layer 1 shut wherever x_0 > 0
    gated = analyze_model(gated_model, batches)
    gates = gated["layers"][1]["out_gates"]
    assert gates["mean_per_head"][0] == 0.5
    assert gates["shut_fraction_per_head"][0] == 0 and gates["shut_fraction_per_head"][1] > 0.1
    assert gates["shut_fraction"] == pytest.approx(gates["shut_fraction_per_head"][1] / 2)
    report = format_report(gated)
    assert "attention sink: mass on position 0" in report and "output gates: mean" in report


# ---- the ablation preset -------------------------------------------------------------------------


def test_the_modern_preset_pairs_each_code_with_rotary_positions_and_adds_gates_latents_and_mqa():
    plan = plan_sweep("modern", "shakespeare")
    variants = [run["variant"] for run in plan["runs"]]
    for code in ("abc", "abb", "aab", "-ab"):
        assert code in variants and f"{code}+rope" in variants
    assert {"abc+out-gate", "abc+mqa"} <= set(variants)
    assert len(variants) * plan["seeds"] == 22 and plan["seeds"] == 2


def test_the_modern_presets_latent_caches_as_many_floats_as_shared_kv():
    model = SWEEP_PRESETS["modern"]["model"]
    latent = next(run for run in plan_sweep("modern", "shakespeare")["runs"] if "latent" in run["variant"])
    cache = {label: GPTConfig(**model, **overrides).attention_spec(0).kv_cache_floats_per_token()
             for label, overrides in [("latent", latent["overrides"]), ("abb", dict(code="abb"))]}
    assert cache["latent"] == cache["abb"] == model["n_embd"]
