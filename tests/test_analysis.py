import json

import numpy as np
import pytest

from minqkv.attention import scores_and_weights
from minqkv.lab.analysis import (analyze_checkpoint, analyze_model, attention_maps, attention_weights, effective_rank,
                                 energy_rank, format_report, match_margins, principal_cosines,
                                 random_subspace_cosine, save_heatmaps, score_asymmetry)
from minqkv.model import GPT, GPTConfig
from minqkv.tensor import no_grad
from minqkv.train import TrainConfig, train

VOCAB, BLOCK = 11, 16


def tiny_model(code="abc", **overrides) -> GPT:
    config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16,
                       code=code, **overrides)
    return GPT(config)


def batches(n=2, batch_size=3, seed=0) -> list:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, (batch_size, BLOCK)), None) for _ in range(n)]


def layer_asymmetry(code):
    return [layer["asymmetry"] for layer in analyze_model(tiny_model(code), batches())["layers"]]


# ---- the math -------------------------------------------------------------------------


def test_effective_rank_of_identity_is_its_size():
    assert effective_rank(np.linalg.svd(np.eye(7), compute_uv=False)) == pytest.approx(7.0)


def test_effective_rank_of_rank_one_matrix_is_one():
    rng = np.random.default_rng(0)
    w = np.outer(rng.standard_normal(6), rng.standard_normal(5))
    assert effective_rank(np.linalg.svd(w, compute_uv=False)) == pytest.approx(1.0, abs=1e-6)


def test_energy_rank_counts_singular_values_for_90_percent_of_energy():
    assert energy_rank(np.ones(10)) == 9
    assert energy_rank([10.0, 1.0, 1.0]) == 1


def test_principal_cosines_of_a_subspace_with_itself_are_one():
    A = np.random.default_rng(0).standard_normal((8, 3))
    np.testing.assert_allclose(principal_cosines(A, A @ np.diag([2.0, -1.0, 0.5])), 1.0, atol=1e-12)


def test_principal_cosines_of_orthogonal_subspaces_are_zero():
    eye = np.eye(6)
    np.testing.assert_allclose(principal_cosines(eye[:, :2], eye[:, 2:5]), 0.0, atol=1e-12)


def test_random_subspace_baseline_lies_between_zero_and_one_and_grows_with_dimension():
    small, large = random_subspace_cosine(32, 2, 2), random_subspace_cosine(32, 24, 24)
    assert 0 < small < large < 1
    assert random_subspace_cosine(8, 8, 3) == pytest.approx(1.0)  # the whole space contains everything


def test_score_asymmetry_is_zero_for_symmetric_and_one_for_antisymmetric_scores():
    S = np.random.default_rng(0).standard_normal((2, 3, 5, 5))
    assert score_asymmetry(S + np.swapaxes(S, -1, -2)) == pytest.approx(0.0)
    assert score_asymmetry(S - np.swapaxes(S, -1, -2)) == pytest.approx(1.0)


# ---- a model --------------------------------------------------------------------------


def test_shared_qk_scores_are_symmetric_and_canonical_scores_are_not():
    assert max(layer_asymmetry("aab")) < 1e-5
    assert min(layer_asymmetry("abc")) > 0.1


def test_canonical_model_reports_three_projections_and_three_untied_overlaps():
    result = analyze_model(tiny_model("abc"), batches())
    json.dumps(result)  # plain JSON all the way down
    assert result["variant"] == "abc" and len(result["layers"]) == 2
    layer = result["layers"][0]
    assert set(layer["projections"]) == {"w_q", "w_k", "w_v"}
    assert layer["projections"]["w_q"]["shape"] == [16, 16]
    assert len(layer["projections"]["w_q"]["singular_values"]) == 16
    assert [(o["a"], o["b"], o["tied"]) for o in layer["overlaps"]] == [
        ("q", "k", False), ("q", "v", False), ("k", "v", False)]
    for o in layer["overlaps"]:
        assert 0 < o["mean_cos"] <= 1 and 0 < o["random_baseline_mean_cos"] < 1
    assert layer["symmetric_by_construction"] is False
    assert "gates" not in layer and "pruned_codes" not in result


def test_untrained_projections_overlap_about_as_much_as_random_subspaces():
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, n_embd=48))
    for o in analyze_model(model, batches())["layers"][0]["overlaps"]:
        assert o["mean_cos"] == pytest.approx(o["random_baseline_mean_cos"], abs=0.08)


def test_a_latent_layer_reports_its_down_and_up_projections_and_the_matrices_they_make():
    layer = analyze_model(tiny_model("abc", latent_kv=4), batches())["layers"][0]
    assert set(layer["projections"]) == {"w_q", "w_k_up", "w_v_up", "w_kv_down", "effective_k", "effective_v"}
    assert layer["projections"]["effective_k"]["shape"] == [16, 16]
    assert layer["projections"]["effective_k"]["rank90"] <= 4  # through a latent 4 wide
    assert [(o["a"], o["b"], o["tied"]) for o in layer["overlaps"]] == [
        ("q", "k", False), ("q", "v", False), ("k", "v", False)]


def test_shared_kv_reports_keys_and_values_tied_through_w_kv():
    result = analyze_model(tiny_model("abb"), batches())
    layer = result["layers"][0]
    assert set(layer["projections"]) == {"w_q", "w_kv"}
    kv = [o for o in layer["overlaps"] if (o["a"], o["b"]) == ("k", "v")][0]
    assert kv["tied"] and kv["weight"] == "w_kv"
    assert kv["mean_cos"] == pytest.approx(1.0, abs=1e-9) and kv["flat_cos"] == pytest.approx(1.0, abs=1e-6)
    assert "tied: one weight w_kv" in format_report(result)


def test_identity_roles_have_no_projection_and_no_overlap():
    layer = analyze_model(tiny_model("-ab"), batches())["layers"][0]
    assert layer["identity_roles"] == "q"
    assert set(layer["projections"]) == {"w_k", "w_v"}
    assert [(o["a"], o["b"]) for o in layer["overlaps"]] == [("k", "v")]


def test_gated_model_reports_gates_effective_matrices_and_pruned_codes():
    model = tiny_model("abc", gate=True)
    for role in "qkv":
        getattr(model.blocks[0].attn, f"gate_{role}").data[:] = 2.0  # gate 0.96: kept, folded
    model.blocks[1].attn.gate_q.data[:] = -4.0  # gate exactly 0: prune() drops layer 1's query projection
    result = analyze_model(model, batches())
    json.dumps(result)
    first = result["layers"][0]
    assert first["gates"] == {role: pytest.approx(1.2 / (1 + np.exp(-2.0)) - 0.1) for role in "qkv"}
    assert {"effective_q", "effective_k", "effective_v"} <= set(first["projections"])
    assert result["pruned_codes"] == ["abc", "-ab"]
    assert "after prune(0.0): abc -ab" in format_report(result)


def test_gated_effective_matrix_at_gate_zero_is_the_identity():
    model = tiny_model("abc", gate=True)
    model.blocks[0].attn.gate_v.data[:] = -50.0
    projection = analyze_model(model, batches(1))["layers"][0]["projections"]["effective_v"]
    assert projection["effective_rank"] == pytest.approx(16.0, abs=1e-4)


def test_analyze_model_leaves_the_model_in_training_mode():
    model = tiny_model("abc", dropout=0.1)
    analyze_model(model, batches(1))
    assert model.training


def test_match_margin_of_identity_q_and_k_is_computed_from_the_normalised_embeddings():
    model = tiny_model("---", dtype="float64")
    e = model.token_embedding.weight.data  # (V, C)
    x = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-5)  # ln_1 at init
    expected = []
    for h in range(2):
        xh = x[:, 8 * h:8 * (h + 1)]
        s = xh @ xh.T / np.sqrt(8)
        off = ~np.eye(VOCAB, dtype=bool)
        expected.append(np.mean(np.diag(s)) - np.mean(s[off]))
    np.testing.assert_allclose(match_margins(model)[0], expected, rtol=1e-9)


def test_a_tied_wide_query_key_matches_equal_tokens_and_gpt2_init_barely_does():
    """The README's recall finding in numbers: at init, margin ~ C std^2 sqrt(hd) for tied Q = K."""
    def layer0_margin(code, **overrides):
        config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=4, n_embd=64, code=code,
                           **overrides)
        return np.mean(match_margins(GPT(config))[0])

    wide, small, canonical = layer0_margin("aab", wide_init=True), layer0_margin("aab"), layer0_margin("abc")
    assert wide > 2.0 and 0 < small < 0.1 and abs(canonical) < 0.05


def test_the_report_prints_the_match_margin():
    result = analyze_model(tiny_model("abc"), batches())
    assert len(result["layers"][0]["match_margin"]) == 2
    assert "match margin" in format_report(result)


def test_attention_weights_are_causal_and_rows_sum_to_one():
    weights = attention_weights(tiny_model("abb"), batches(1)[0][0])
    assert len(weights) == 2 and weights[0].shape == (3, 2, BLOCK, BLOCK)
    np.testing.assert_allclose(weights[1].sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(weights[0], k=1) == 0)


def test_attention_maps_are_each_layers_scores_and_weights_of_the_input_the_model_gives_it():
    model, ids = tiny_model("abb", pos2d=True, out_gate=True), batches(1)[0][0]
    maps = attention_maps(model, ids)
    with no_grad():
        x = model.blocks[0](model.embed(ids))  # layer 1's input (B, T, C)
        attn = model.blocks[1].attn
        q, k, _ = attn.project(model.blocks[1].ln_1(x))
        scores, weights = scores_and_weights(q, k, attn.score_bias(0, BLOCK))
        gates = attn.out_gates(model.blocks[1].ln_1(x))
    for got, want in zip(maps[1], (scores, weights, gates)):
        np.testing.assert_allclose(got, want.data, rtol=1e-6, atol=1e-7)


def test_attention_maps_of_a_training_model_use_no_dropout_and_leave_it_training():
    model, ids = tiny_model("abc", dropout=0.5), batches(1)[0][0]
    state = model.dropout_rng.bit_generator.state
    first, second = attention_maps(model, ids), attention_maps(model, ids)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[1], b[1])
    assert model.training and model.dropout_rng.bit_generator.state == state


# ---- a checkpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    text = root / "text.txt"
    text.write_text("the cat sat on the mat and the dog ate the hat. " * 60)  # 2880 characters
    config = GPTConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, code="abb")
    train(config, TrainConfig(data=str(text), out=str(root / "run"), steps=5, eval_interval=5,
                              eval_iters=1, batch_size=4), progress=False)
    return root


def test_analyze_checkpoint_scores_the_run_on_its_own_validation_text(checkpoint):
    result = analyze_checkpoint(checkpoint / "run", n_batches=1, batch_size=2)
    json.dumps(result)
    assert result["variant"] == "abb" and result["step"] == 5
    assert result["data"] == str(checkpoint / "text.txt")
    assert all(0 < layer["asymmetry"] < 1 for layer in result["layers"])
    report = format_report(result)
    assert "layer 0  abb" in report and "layer 1  abb" in report


def test_analyze_checkpoint_reports_the_attention_sink_and_output_gates_of_a_gated_run(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ate the hat. " * 60)
    config = GPTConfig(block_size=BLOCK, n_layer=1, n_head=2, n_embd=16, out_gate=True, pos="rope")
    train(config, TrainConfig(data=str(text), out=str(tmp_path / "run"), steps=3, eval_interval=3,
                              eval_iters=1, batch_size=4), progress=False)
    result = analyze_checkpoint(tmp_path / "run", n_batches=1, batch_size=2)
    layer = result["layers"][0]
    assert 0 < layer["sink_mass"] < 1 and 0 < layer["out_gates"]["mean"] < 1
    assert result["variant"] == "abc+rope+out-gate"


def test_analyze_checkpoint_reads_other_data_in_the_checkpoint_vocabulary(checkpoint):
    other = checkpoint / "other.txt"
    other.write_text("a cat and a dog sat on the hat. " * 90)  # fewer characters than the run's text
    result = analyze_checkpoint(checkpoint / "run", data=str(other), n_batches=1, batch_size=2)
    assert result["data"] == str(other)


def test_analyze_checkpoint_rejects_data_with_unknown_characters(checkpoint):
    other = checkpoint / "unknown.txt"
    other.write_text("ZZZ QQQ XXX " * 240)
    with pytest.raises(ValueError, match="cannot be read by this checkpoint's tokenizer"):
        analyze_checkpoint(checkpoint / "run", data=str(other), n_batches=1, batch_size=2)


def test_heatmaps_are_one_png_per_layer(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    result = analyze_checkpoint(checkpoint / "run", n_batches=1, batch_size=2, heatmaps_dir=tmp_path)
    names = [p.rsplit("/", 1)[-1] for p in result["heatmaps"]]
    assert names == ["attention_layer0.png", "attention_layer1.png"]
    for path in result["heatmaps"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_save_heatmaps_takes_one_sequence(tmp_path):
    pytest.importorskip("matplotlib")
    paths = save_heatmaps(tiny_model("aab"), np.arange(BLOCK) % VOCAB, tmp_path / "maps")
    assert len(paths) == 2 and all(p.exists() for p in paths)
