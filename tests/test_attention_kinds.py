"""Specification of the attention kinds a label adds to a code: a sliding window (+windowW), linear
attention (+linear, +performerM) and ALiBi positions (+alibi). Each is checked against the plain
softmax attention it replaces or restricts, against a step-by-step reference, and through decoding."""

import math

import numpy as np
import pytest

import minqkv.attention as attention_module
from minqkv import linear_attention, modifiers
from minqkv.attention import alibi_bias, alibi_slopes, attend, scores_and_weights, weighted_values
from minqkv.lab import cli
from minqkv.lab.variant_checks import tiny_model
from minqkv.model import GPT, GPTConfig
from minqkv.tensor import Tensor, no_grad

VOCAB, BLOCK = 7, 8
TINY = dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=8, dtype="float64")


def tiny_gpt(label: str = "abc", seed: int = 0, **overrides) -> GPT:
    """A 2-layer float64 GPT of the label, every parameter moved off its initial value, evaluating."""
    return tiny_model({**TINY, **GPTConfig.overrides_from_label(label), **overrides}, seed).eval()


def random_ids(B: int = 2, T: int = BLOCK, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (B, T))


def full_logits(model: GPT, ids: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(ids)[0].data


# ---- the labels -----------------------------------------------------------------------------------


def test_variants_modifiers_lists_window_linear_performer_and_alibi(capsys):
    assert cli.main(["variants", "--modifiers"]) == 0
    written = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert {"windowW", "linear", "performerM", "alibi"} <= set(written)


@pytest.mark.parametrize("label, fields", [
    ("abc+window16", dict(window=16)), ("abc+linear", dict(linear_features=0)),
    ("abc+performer64", dict(linear_features=64)), ("abc+alibi", dict(pos="alibi"))])
def test_each_attention_kind_is_one_field_of_the_config_and_its_label_reads_back(label, fields):
    assert modifiers.parse(label) == dict(code="abc", **fields)
    assert GPTConfig(**TINY, **fields).variant_label() == label


@pytest.mark.parametrize("fields, message", [
    (dict(window=0), "window must be a whole number >= 1"),
    (dict(window=True), "window must be a whole number >= 1"),
    (dict(window=2.0), "window must be a whole number >= 1"),
    (dict(linear_features=-1), "linear_features must be a whole number >= 0"),
    (dict(window=2, linear_features=0), "linear attention, which has no scores: give one of them"),
    (dict(window=2, linear_features=8), "give one of them"),
    (dict(linear_features=0, pos2d=True), "cannot go with pos2d"),
    (dict(linear_features=0, pos="alibi"), "cannot go with pos='alibi'"),
    (dict(linear_features=8, latent_kv=4), "cannot go with latent_kv=4"),
], ids=["window-0", "window-True", "window-float", "linear-features-negative", "window-with-linear",
        "window-with-performer", "linear-with-pos2d", "linear-with-alibi", "performer-with-latent-kv"])
def test_the_config_refuses_an_attention_kind_it_cannot_build_and_says_why(fields, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**TINY, **fields)


@pytest.mark.parametrize("label, message", [
    ("abc+window2+linear", "combines 'window2' and 'linear', which cannot go together"),
    ("abc+performer8+window2", "combines 'performer8' and 'window2', which cannot go together"),
    ("abc+linear+alibi", "combines 'linear' and 'alibi', which cannot go together"),
    ("abc+pos2d+linear", "combines 'pos2d' and 'linear', which cannot go together"),
    ("abc+latent-kv4+performer8", "combines 'latent-kv4' and 'performer8', which cannot go together"),
    ("abc+linear+performer8", "sets linear_features twice"),
    ("abc+rope+alibi", "sets pos twice"),
    ("abc+window0", "windowW takes W as a whole number above 0"),
    ("abc+performer", "performerM takes M as a whole number above 0"),
])
def test_a_label_refuses_attention_kinds_that_cannot_go_together(label, message):
    with pytest.raises(ValueError, match=message):
        modifiers.parse(label)


# ---- ALiBi ------------------------------------------------------------------------------------------


def press_slopes(n: int) -> list:
    """The slopes as Press et al. compute them (their get_slopes), written apart from alibi_slopes:
    a geometric sequence from 2^(-8/n) for a power of two; otherwise the sequence of the largest
    power of two below n, then every other slope of the sequence for twice that power."""
    if math.log2(n).is_integer():
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    power = 2 ** math.floor(math.log2(n))
    return press_slopes(power) + press_slopes(2 * power)[0::2][:n - power]


def test_alibi_slopes_of_8_heads_halve_from_one_half():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -h for h in range(1, 9)], rtol=1e-15)


def test_alibi_slopes_of_6_heads_are_the_4_head_slopes_then_every_other_8_head_slope():
    np.testing.assert_allclose(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3], rtol=1e-15)


@pytest.mark.parametrize("n_head", [1, 2, 3, 5, 6, 7, 12, 16])
def test_alibi_slopes_follow_press_et_al_for_any_number_of_heads(n_head):
    np.testing.assert_allclose(alibi_slopes(n_head), press_slopes(n_head), rtol=1e-14)


def test_alibi_bias_falls_with_the_distance_to_the_key_at_each_heads_slope():
    H, past, T = 4, 3, 2
    bias = alibi_bias(H, past, T, np.float64)
    assert bias.shape == (H, T, past + T) and bias.dtype == np.float64
    distance = np.array([[3, 2, 1, 0, -1], [4, 3, 2, 1, 0]])  # query positions 3, 4 minus key positions 0..4
    np.testing.assert_allclose(bias, -alibi_slopes(H)[:, None, None] * distance, rtol=1e-15)
    assert np.all(bias[:, 1, :4] < 0) and np.all(bias[:, 1, 4] == 0)  # earlier keys lose, the query's own key not
    assert np.all(np.diff(bias[:, 1, :5], axis=-1) > 0)  # the nearer the key, the higher its bias


# ---- the sliding window -------------------------------------------------------------------------


@pytest.mark.parametrize("window", [BLOCK, 2 * BLOCK])
def test_a_window_as_long_as_the_sequence_is_full_attention(window):
    ids = random_ids()
    np.testing.assert_array_equal(full_logits(tiny_gpt(window=window), ids), full_logits(tiny_gpt(), ids))


def test_a_window_shorter_than_the_sequence_changes_only_the_queries_past_it():
    W, ids = 3, random_ids()
    windowed, full = full_logits(tiny_gpt(window=W), ids), full_logits(tiny_gpt(), ids)
    np.testing.assert_array_equal(windowed[:, :W], full[:, :W])  # the first W queries see every key anyway
    assert np.all(np.abs(windowed[:, W:] - full[:, W:]).max(axis=(0, 2)) > 1e-6)  # every later query


def logits_loss_and_gradients(model: GPT, ids: np.ndarray) -> list:
    model.zero_grad()
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return [logits.data, loss.data] + [p.grad for _, p in model.named_parameters()]


def step_by_step_attend(q, k, v, bias=None, dropout=None, window=None):
    """attend through scores_and_weights and weighted_values, the matrices kept: the reference."""
    return weighted_values(scores_and_weights(q, k, bias, window)[1], v)


@pytest.mark.parametrize("label", ["abc+window2", "abb+rope+window3+gqa2", "aab+alibi+window1", "abc+pos2d+window5"])
def test_a_windowed_models_logits_loss_and_gradients_equal_the_step_by_step_references(monkeypatch, label):
    model = tiny_gpt(label)
    ids = random_ids(T=BLOCK + 1)
    fused = logits_loss_and_gradients(model, ids)
    monkeypatch.setattr(attention_module, "attend", step_by_step_attend)
    reference = logits_loss_and_gradients(model, ids)
    for got, want in zip(fused, reference):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_the_window_mask_hides_exactly_the_keys_before_each_querys_last_w():
    mask = attention_module.window_mask(T=2, Tk=5, window=2, dtype=np.float64)  # queries at positions 3 and 4
    np.testing.assert_array_equal(np.isinf(mask), [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])


# ---- decoding: a window's cache and linear attention's state --------------------------------------

DECODED = ["abc+window3", "abb+window1+gqa2", "abc+alibi+window2", "abc+rope+window2", "abc+latent-kv4+window2",
           "abc+rope+latent-kv4+window2", "aab+pos2d+window2", "abc+linear", "abb+linear+mqa", "abc+rope+linear",
           "abc+performer16", "abb+out-gate+performer8+gqa2"]


@pytest.mark.parametrize("label", DECODED)
def test_decoding_one_token_at_a_time_after_a_prompt_equals_recomputing_the_sequence(label):
    model, ids, prompt = tiny_gpt(label), random_ids(), 5  # the prompt is longer than every window here
    caches = model.new_caches()
    with no_grad():
        chunks = [model(ids[:, :prompt], caches=caches)[0].data]
        chunks += [model(ids[:, t:t + 1], caches=caches)[0].data for t in range(prompt, BLOCK)]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full_logits(model, ids), rtol=0, atol=1e-12)


@pytest.mark.parametrize("label", ["abc+window3", "abc+rope+latent-kv4+window2", "abc+linear", "abc+performer16"])
def test_generate_through_the_caches_equals_greedy_decoding_by_recomputation(label):
    model, prompt = tiny_gpt(label), random_ids(T=2)
    generated = model.generate(prompt, BLOCK - 2, temperature=1e-9, rng=np.random.default_rng(0))
    ids = prompt
    for _ in range(BLOCK - 2):
        ids = np.concatenate([ids, full_logits(model, ids)[:, -1:].argmax(axis=-1)], axis=1)
    np.testing.assert_array_equal(generated, ids)


def measured_and_predicted_state(label: str, T: int = 2 * BLOCK) -> tuple:
    """Per layer, after each of T tokens decoded one at a time: the floats its cache holds
    (KVCache.state_floats) and what AttentionSpec.decode_state_floats says a decoder keeps."""
    model, ids = tiny_gpt(label, pos="none"), random_ids(T=T)  # no position table: past block_size
    caches, measured, predicted = model.new_caches(), [], []
    with no_grad():
        for t in range(ids.shape[1]):
            model(ids[:, t:t + 1], caches=caches)
            measured.append([cache.state_floats() for cache in caches])
            predicted.append([block.attn.spec.decode_state_floats(t + 1) for block in model.blocks])
    return np.array(measured), np.array(predicted)


def test_a_windows_cache_holds_the_last_w_tokens_however_long_the_sequence():
    W, per_token = 3, 2 * TINY["n_embd"]  # K and V, each n_embd wide
    measured, predicted = measured_and_predicted_state(f"abc+window{W}")
    np.testing.assert_array_equal(measured, predicted)
    np.testing.assert_array_equal(measured[:, 0], [per_token * min(t + 1, W) for t in range(2 * BLOCK)])


def test_a_windows_cache_after_a_long_prompt_shrinks_back_to_w_tokens():
    W, per_token, prompt = 2, 2 * TINY["n_embd"], 6
    model, ids = tiny_gpt(f"abc+window{W}", pos="none"), random_ids(T=prompt + 3)
    caches = model.new_caches()
    with no_grad():
        model(ids[:, :prompt], caches=caches)
        assert caches[0].state_floats() == prompt * per_token  # the prompt's keys, read by its own queries
        for t in range(prompt, prompt + 3):
            model(ids[:, t:t + 1], caches=caches)
            assert caches[0].state_floats() == W * per_token


@pytest.mark.parametrize("label, features", [("abc+linear", 2), ("abb+performer16+gqa2", 16)])
def test_linear_attentions_state_is_the_same_size_after_any_number_of_tokens(label, features):
    measured, predicted = measured_and_predicted_state(label)
    np.testing.assert_array_equal(measured, predicted)
    kv_heads = GPTConfig(**TINY, **GPTConfig.overrides_from_label(label)).kv_heads
    head_dim = TINY["n_embd"] // TINY["n_head"]
    assert np.all(measured == kv_heads * (features * head_dim + features))  # S (M, hd) and z (M) per key head


def test_plain_attentions_cache_grows_with_every_token():
    measured, predicted = measured_and_predicted_state("abc")
    np.testing.assert_array_equal(measured, predicted)
    np.testing.assert_array_equal(measured[:, 0], [2 * TINY["n_embd"] * (t + 1) for t in range(2 * BLOCK)])


# ---- sequences longer than block_size ---------------------------------------------------------


@pytest.mark.parametrize("label", ["abc+alibi", "abc+alibi+window3", "abc+rope", "abc+no-pos", "abc+rope+linear",
                                   "abc+no-pos+performer16"])
def test_a_model_without_a_position_table_reads_twice_block_size(label):
    model, ids = tiny_gpt(label), random_ids(T=2 * BLOCK)
    logits = full_logits(model, ids)
    assert logits.shape == (2, 2 * BLOCK, VOCAB) and np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits[:, :BLOCK], full_logits(model, ids[:, :BLOCK]), rtol=0, atol=1e-12)  # causal


@pytest.mark.parametrize("label", ["abc", "abc+alibi+pos2d"])
def test_a_model_with_a_position_table_refuses_a_sequence_longer_than_block_size(label):
    with pytest.raises(ValueError, match=f"longer than block_size={BLOCK}"):
        tiny_gpt(label)(random_ids(T=2 * BLOCK))


# ---- Performer estimates softmax attention ------------------------------------------------------


def performer_error(M: int, seed: int = 0) -> float:
    """Largest difference between Performer attention with M features and softmax attention."""
    rng = np.random.default_rng(seed)
    q, k, v = (Tensor(0.5 * rng.standard_normal((1, 2, BLOCK, 4))) for _ in range(3))  # (B, H, T, hd)
    projection = linear_attention.draw_performer_projection(4, M, np.random.default_rng(seed + 1))
    features = [linear_attention.performer_features(t, projection) for t in (q, k)]
    estimate = linear_attention.causal_linear_attention(*features, v).data  # (B, H, T, hd)
    exact = attend(q, k, v).data.reshape(1, BLOCK, 2, 4).transpose(0, 2, 1, 3)  # (B, T, H*hd) -> (B, H, T, hd)
    return float(np.abs(estimate - exact).max())


def test_performer_attention_with_many_features_approximates_softmax_attention():
    assert performer_error(4096) < 0.05  # outputs of size about 1
    assert performer_error(4096) < performer_error(8)
