"""Specification of the char GPT: incremental decoding, sampling, per-layer variants, pruning of
gated models, configuration checks and labels."""

import math

import numpy as np
import pytest

import minqkv.attention as attention_module
import minqkv.model as model_module
from minqkv.attention import ALL_CODES, scores_and_weights, weighted_values
from minqkv.data import IGNORE
from minqkv.model import GPT, GPTConfig
from minqkv.tensor import Tensor, no_grad
from minqkv.lab.variant_checks import tiny_model

VOCAB, BLOCK, WIDTH = 7, 8, 8
TINY = dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=WIDTH, dtype="float64")


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """A 2-layer float64 GPT with every parameter moved off its initial value, in evaluation mode
    (deterministic gates)."""
    return tiny_model({**TINY, **overrides}, seed).eval()


def labelled(label: str) -> dict:
    return GPTConfig.overrides_from_label(label)


def random_ids(B: int = 2, T: int = BLOCK, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (B, T))


def full_logits(model: GPT, ids: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(ids)[0].data


DECODE_CASES = ([pytest.param(labelled(code), id=code) for code in ALL_CODES]
                + [pytest.param(labelled(label), id=label) for label in
                   ["aaa+rotate", "aab+pos2d", "abc+gate", "aaa+gate", "abb+gqa2", "abc+mqa",
                    "abb+rotate+mqa", "aab+rotate+pos2d+gate", "abc+no-out-proj",
                    "abc+rope", "abb+rope", "aab+rope", "---+rope", "-aa+rope", "abb+rope+gqa2",
                    "abc+rope+mqa", "abb+rotate+rope", "aab+pos2d+gate+rope", "abc+no-pos",
                    "abc+out-gate", "abb+out-gate+gqa2", "abc+latent-kv4", "abb+latent-kv4",
                    "-ab+latent-kv6+mqa", "abc+rope+latent-kv6+gqa2", "abb+rope+out-gate+latent-kv4",
                    "abc+gate+latent-kv4", "abc+window3", "abb+window1+gqa2", "abc+alibi", "aab+alibi+window4",
                    "abc+pos2d+alibi", "abc+linear", "abb+linear+gqa2", "---+linear", "abc+rope+linear",
                    "abc+performer16", "abc+rotate+performer8+mqa"]]
                + [pytest.param(dict(layer_codes=["abb", "-a-"]), id="per-layer")])


# ---- incremental decoding through the KV cache ------------------------------------------------


@pytest.mark.parametrize("prompt", [1, 3], ids=["from-one-token", "after-a-3-token-prompt"])
@pytest.mark.parametrize("overrides", DECODE_CASES)
def test_kv_cache_decoding_one_token_at_a_time_equals_full_recomputation(overrides, prompt):
    model = tiny_gpt(**overrides)
    ids = random_ids()
    caches = model.new_caches()
    with no_grad():
        chunks = [model(ids[:, :prompt], caches=caches)[0].data]  # the prompt in one call
        chunks += [model(ids[:, t:t + 1], caches=caches)[0].data for t in range(prompt, BLOCK)]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full_logits(model, ids), rtol=0, atol=1e-12)


FUSED_CASES = [pytest.param(labelled(label), id=label) for label in
               ["abc", "abb", "--a", "aab+pos2d", "abb+gqa2", "abc+mqa", "abb+rotate", "abc+gate", "abc+window3",
                "abc+alibi", "abc+pos2d+alibi+window5+gqa2"]]


def logits_loss_and_gradients(model: GPT, ids: np.ndarray) -> list:
    model.zero_grad()
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return [logits.data, loss.data] + [p.grad for _, p in model.named_parameters()]


def step_by_step_attend(q, k, v, bias=None, dropout=None, window=None):
    """attend without its fused kernel (and without dropout): the reference path."""
    return weighted_values(scores_and_weights(q, k, bias, window)[1], v)


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 2e-6)])
@pytest.mark.parametrize("overrides", FUSED_CASES)
def test_the_fused_attention_path_gives_the_reference_paths_logits_loss_and_gradients(monkeypatch, overrides, dtype,
                                                                                    tolerance):
    model = tiny_gpt(**overrides, dtype=dtype)
    ids = random_ids(T=BLOCK + 1)
    fused = logits_loss_and_gradients(model, ids)
    monkeypatch.setattr(attention_module, "attend", step_by_step_attend)
    reference = logits_loss_and_gradients(model, ids)
    for got, want in zip(fused, reference):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("training, dropout, fused_calls", [(True, 0.0, 2), (False, 0.5, 2), (True, 0.5, 0)],
                         ids=["training", "evaluation-with-dropout-off", "dropout-active"])
def test_the_model_runs_the_fused_kernel_unless_dropout_is_active(monkeypatch, training, dropout, fused_calls):
    import minqkv.kernels as kernels

    calls = []
    fused = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *args, **kw: calls.append(1) or fused(*args, **kw))
    model = tiny_gpt(dropout=dropout).train(training)
    model(random_ids())
    assert len(calls) == fused_calls


@pytest.mark.parametrize("label", ["abc", "abc+gqa2", "abb"])
def test_the_fused_kernel_reads_q_k_v_inside_the_projection_and_dy_inside_the_output_gradient(monkeypatch, label):
    """No layout copies around the fused attention of a training step: the C core gets pointers
    into the one product x [W_q | W_k | W_v] that q, k and v are views of (a copy would have a
    buffer of its own), and dy as the (B, T, H, hd) memory that the output projection's backward
    wrote, a view of it."""
    import minqkv.kernels as kernels
    from minqkv.kernels import runtime

    if kernels.get_backend() != "c":
        pytest.skip("the C core is not in use")

    def buffer(a):
        return buffer(a.base) if a.base is not None else a

    def inside(address, array):  # array: a whole contiguous buffer
        return array.ctypes.data <= address < array.ctypes.data + array.nbytes

    seen, pointers = [], []
    forward, backward, c_function = kernels.attention, kernels.attention_backward, runtime.c_function
    monkeypatch.setattr(kernels, "attention", lambda q, k, v, *rest, **kw: seen.append((q, k, v))
                        or forward(q, k, v, *rest, **kw))
    monkeypatch.setattr(kernels, "attention_backward", lambda q, k, v, bias, y, lse, dy, *rest, **kw:
                        seen.append((q, k, v, dy)) or backward(q, k, v, bias, y, lse, dy, *rest, **kw))

    def first_three_pointers(c_function):  # q, k and v: the first three arrays a C attention kernel takes
        def spy(*args):
            arrays = [arg for arg in args if isinstance(arg, runtime.ffi.CData)]
            pointers.append([int(runtime.ffi.cast("uintptr_t", a)) for a in arrays[:3]])
            return c_function(*args)
        return spy

    monkeypatch.setattr(runtime, "c_function", lambda name, dtype: first_three_pointers(c_function(name, dtype))
                        if name in ("attention", "attention_backward") else c_function(name, dtype))
    model = tiny_gpt(**labelled(label)).train()
    logits_loss_and_gradients(model, random_ids(T=BLOCK + 1))
    assert len(seen) == len(pointers) == 4  # two layers, forward and backward
    for (q, k, v, *dy), addresses in zip(seen, pointers):
        product = buffer(q)
        assert buffer(k) is product and buffer(v) is product
        assert all(inside(address, product) for address in addresses)
        for gradient in dy:
            assert gradient.transpose(0, 2, 1, 3).flags.c_contiguous and gradient.base is not None


@pytest.mark.parametrize("overrides", FUSED_CASES)
def test_kv_cache_decoding_on_the_fused_path_equals_the_reference_paths_full_logits(monkeypatch, overrides):
    model = tiny_gpt(**overrides)
    ids = random_ids()
    caches = model.new_caches()
    with no_grad():
        chunks = [model(ids[:, :3], caches=caches)[0].data]
        chunks += [model(ids[:, t:t + 1], caches=caches)[0].data for t in range(3, BLOCK)]
        monkeypatch.setattr(attention_module, "attend", step_by_step_attend)
        reference = model(ids)[0].data
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), reference, rtol=0, atol=1e-12)


def test_cache_length_counts_the_tokens_seen():
    model = tiny_gpt()
    caches = model.new_caches()
    with no_grad():
        model(random_ids(T=3), caches=caches)
        model(random_ids(T=2), caches=caches)
    assert [c.length for c in caches] == [5, 5]


# ---- forward errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [np.zeros(4, dtype=int), np.zeros((1, 2, 3), dtype=int)])
def test_forward_rejects_ids_that_are_not_two_dimensional(ids):
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        tiny_gpt()(ids)


def test_forward_rejects_a_sequence_longer_than_block_size():
    with pytest.raises(ValueError, match="longer than block_size=8"):
        tiny_gpt()(random_ids(T=BLOCK + 1))


def test_forward_rejects_new_tokens_that_overflow_the_cache():
    model = tiny_gpt()
    caches = model.new_caches()
    with no_grad():
        model(random_ids(T=6), caches=caches)
        with pytest.raises(ValueError, match="sequence of 9 tokens"):
            model(random_ids(T=3), caches=caches)


def test_forward_returns_logits_over_the_vocabulary_and_a_scalar_loss():
    ids = random_ids()
    logits, loss = tiny_gpt()(ids, np.roll(ids, -1, axis=1))
    assert logits.shape == (2, BLOCK, VOCAB)
    assert loss.shape == () and np.isfinite(loss.data)


def loss_and_gradients(model, loss):
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return float(loss.data), {name: p.grad.copy() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scored", ["every-position", "a-quarter", "none"])
def test_the_loss_over_scored_positions_alone_equals_forwards_loss_and_gradients(scored):
    # model.loss sends only the scored rows through the output head (a task's answers); it must
    # be the same function of the weights as forward's loss over all rows
    model = tiny_model({})
    rng = np.random.default_rng(3)
    ids = rng.integers(0, model.config.vocab_size, (2, model.config.block_size))
    targets = rng.integers(0, model.config.vocab_size, ids.shape)
    keep = {"every-position": 1.0, "a-quarter": 0.25, "none": 0.0}[scored]
    targets = np.where(rng.random(ids.shape) < keep, targets, IGNORE)
    whole_value, whole_grads = loss_and_gradients(model, model(ids, targets)[1])
    value, grads = loss_and_gradients(model, model.loss(ids, targets))
    if scored == "every-position":  # text takes forward's path: the same numbers, bit for bit
        assert value == whole_value
    assert value == pytest.approx(whole_value, rel=1e-12, abs=1e-15)
    assert grads.keys() == whole_grads.keys()
    for name in grads:
        np.testing.assert_allclose(grads[name], whole_grads[name], rtol=1e-10, atol=1e-13, err_msg=name)


def test_scored_logits_are_forwards_logits_at_the_scored_positions():
    model = tiny_model({})
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, (2, model.config.block_size))
    targets = np.full(ids.shape, IGNORE)
    targets[0, 3], targets[1, 0], targets[1, -1] = 5, 1, 2
    with no_grad():
        logits, answers = model.scored_logits(ids, targets)
        whole, _ = model(ids)
    assert logits.shape == (3, model.config.vocab_size)
    assert answers.tolist() == [5, 1, 2]
    np.testing.assert_allclose(logits.data, whole.data[[0, 1, 1], [3, 0, -1]], rtol=1e-12)


# ---- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_generate_rejects_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be positive"):
        tiny_gpt().generate(random_ids(T=2), 3, temperature=temperature)


@pytest.mark.parametrize("top_k", [0, -2])
def test_generate_rejects_a_top_k_that_is_not_positive(top_k):
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        tiny_gpt().generate(random_ids(T=2), 3, top_k=top_k)


@pytest.mark.parametrize("temperature", [math.inf, math.nan])
def test_generate_rejects_a_temperature_that_is_not_finite(temperature):
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        tiny_gpt().generate(random_ids(T=2), 3, temperature=temperature)


@pytest.mark.parametrize("temperature", [True, "0.8", None])
def test_generate_rejects_a_temperature_that_is_not_a_number(temperature):
    with pytest.raises(TypeError, match="temperature must be a number"):
        tiny_gpt().generate(random_ids(T=2), 3, temperature=temperature)


@pytest.mark.parametrize("top_k", [2.5, True, "3"])
def test_generate_rejects_a_top_k_that_is_not_an_integer(top_k):
    with pytest.raises(TypeError, match="top_k must be a positive integer or None"):
        tiny_gpt().generate(random_ids(T=2), 3, top_k=top_k)


@pytest.mark.parametrize("shape", [(1, 0), (0, 3), (3,)])
def test_generate_needs_a_prompt_of_at_least_one_token_in_a_batch_of_rows(shape):
    with pytest.raises(ValueError, match="ids must have shape \\(B, T\\) with at least one row and one token"):
        tiny_gpt().generate(np.zeros(shape, dtype=np.int64), 3)


@pytest.mark.parametrize("count, error", [(-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_generate_rejects_a_token_count_that_is_not_a_whole_number_at_least_zero(count, error):
    with pytest.raises(error, match="max_new_tokens must be"):
        tiny_gpt().generate(random_ids(T=2), count)


@pytest.mark.parametrize("temperature", [1e-320, 1e-30])
def test_a_tiny_temperature_decodes_greedily(temperature):
    model, prompt = tiny_gpt(), random_ids(B=3, T=2)
    out = model.generate(prompt, 6, temperature=temperature, rng=np.random.default_rng(0))
    assert np.array_equal(out, model.generate(prompt, 6, top_k=1, rng=np.random.default_rng(0)))


def test_generate_refuses_logits_that_are_not_finite():
    model = tiny_gpt()
    model.token_embedding.weight.data[0, 0] = np.nan
    with pytest.raises(RuntimeError, match="logits are not all finite"):
        model.generate(random_ids(T=2), 3)


def test_generate_appends_tokens_from_the_vocabulary():
    prompt = random_ids(B=3, T=2)
    out = tiny_gpt().generate(prompt, 5, rng=np.random.default_rng(0))
    assert out.shape == (3, 7)
    assert np.array_equal(out[:, :2], prompt)
    assert out.min() >= 0 and out.max() < VOCAB


def test_generate_is_deterministic_given_the_generator():
    model, prompt = tiny_gpt(), random_ids(T=2)
    first = model.generate(prompt, 6, temperature=1.5, rng=np.random.default_rng(7))
    second = model.generate(prompt, 6, temperature=1.5, rng=np.random.default_rng(7))
    assert np.array_equal(first, second)


@pytest.mark.parametrize("overrides", [{}, labelled("aab+pos2d")], ids=["abc", "aab+pos2d"])
def test_generate_continues_past_block_size(overrides):
    out = tiny_gpt(**overrides).generate(random_ids(T=3), 3 * BLOCK, rng=np.random.default_rng(0))
    assert out.shape == (2, 3 + 3 * BLOCK)
    assert out.min() >= 0 and out.max() < VOCAB


def test_top_k_of_one_is_greedy_decoding():
    model, prompt = tiny_gpt(), random_ids(B=3, T=2)
    out = model.generate(prompt, 6, top_k=1, rng=np.random.default_rng(0))
    greedy = prompt
    for _ in range(6):
        greedy = np.concatenate([greedy, full_logits(model, greedy)[:, -1:].argmax(-1)], axis=1)
    assert np.array_equal(out, greedy)


def test_generate_samples_from_the_logits_of_the_whole_sequence(monkeypatch):
    model, prompt = tiny_gpt(), random_ids(T=2)
    seen = []
    real = model_module._sample_logits
    monkeypatch.setattr(model_module, "_sample_logits",
                        lambda logits, *a: seen.append(logits.copy()) or real(logits, *a))
    out = model.generate(prompt, BLOCK - 2, rng=np.random.default_rng(0))
    for step, logits in enumerate(seen):
        np.testing.assert_allclose(logits, full_logits(model, out[:, :2 + step])[:, -1], atol=1e-12)


def record_sampled_logits(monkeypatch) -> list:
    """Make generate() keep a copy of the logits (B, V) it samples each token from."""
    seen = []
    real = model_module._sample_logits
    monkeypatch.setattr(model_module, "_sample_logits",
                        lambda logits, *a: seen.append(logits.copy()) or real(logits, *a))
    return seen


@pytest.mark.parametrize("overrides", [{}, labelled("aab+pos2d"), labelled("abb+rotate+mqa")],
                         ids=["abc", "aab+pos2d", "abb+rotate+mqa"])
def test_generate_past_block_size_conditions_each_token_on_the_last_block_size_tokens(monkeypatch, overrides):
    model, prompt = tiny_gpt(**overrides), random_ids(T=3)
    seen = record_sampled_logits(monkeypatch)
    out = model.generate(prompt, 3 * BLOCK, rng=np.random.default_rng(0))
    assert len(seen) == 3 * BLOCK
    for step, logits in enumerate(seen):
        context = out[:, :3 + step][:, -BLOCK:]  # nanoGPT's crop
        np.testing.assert_allclose(logits, full_logits(model, context)[:, -1], rtol=0, atol=1e-12)


def test_generate_from_a_prompt_longer_than_block_size_reads_its_last_block_size_tokens(monkeypatch):
    model, prompt = tiny_gpt(), random_ids(T=BLOCK + 5)
    seen = record_sampled_logits(monkeypatch)
    model.generate(prompt, 1, rng=np.random.default_rng(0))
    np.testing.assert_allclose(seen[0], full_logits(model, prompt[:, -BLOCK:])[:, -1], rtol=0, atol=1e-12)


def test_greedy_decoding_past_block_size_equals_greedy_on_the_cropped_context():
    model, prompt = tiny_gpt(), random_ids(B=3, T=2)
    out = model.generate(prompt, 2 * BLOCK, top_k=1, rng=np.random.default_rng(0))
    greedy = prompt
    for _ in range(2 * BLOCK):
        next_id = full_logits(model, greedy[:, -BLOCK:])[:, -1:].argmax(-1)  # (B, 1)
        greedy = np.concatenate([greedy, next_id], axis=1)
    assert np.array_equal(out, greedy)


def test_sampling_keeps_only_the_top_k_tokens():
    logits = np.array([[0.0, 3.0, 1.0, 2.0, -1.0]] * 400)  # (B, V) float64
    ids = model_module._sample_logits(logits, 1.0, 2, np.random.default_rng(0))
    assert set(ids.ravel()) == {1, 3}


def test_generate_reads_a_prompt_that_fits_in_block_size_whole(monkeypatch):
    model, prompt = tiny_gpt(), random_ids(T=BLOCK - 1)
    seen = []
    real = model_module._sample_logits
    monkeypatch.setattr(model_module, "_sample_logits",
                        lambda logits, *a: seen.append(logits.copy()) or real(logits, *a))
    model.generate(prompt, 1, rng=np.random.default_rng(0))
    np.testing.assert_allclose(seen[0], full_logits(model, prompt)[:, -1], atol=1e-12)


def test_generate_leaves_the_training_mode_as_it_was():
    model = tiny_gpt().train()
    model.generate(random_ids(T=2), 2, rng=np.random.default_rng(0))
    assert model.training
    model.eval()
    model.generate(random_ids(T=2), 2, rng=np.random.default_rng(0))
    assert not model.training


# ---- per-layer variants --------------------------------------------------------------------------


def test_each_layer_uses_its_own_code():
    model = GPT(GPTConfig(**{**TINY, "n_layer": 3}, layer_codes=["canonical", "shared-kv", "---"]))
    assert [b.attn.spec.code for b in model.blocks] == ["abc", "abb", "---"]
    assert [b.attn.num_parameters() for b in model.blocks] == [4 * 64, 3 * 64, 64]


def test_layer_codes_must_name_one_code_per_layer():
    with pytest.raises(ValueError, match="layer_codes has 3 codes but n_layer=2"):
        GPTConfig(**TINY, layer_codes=["abc", "abb", "aaa"])


def test_variant_label_lists_the_distinct_per_layer_codes():
    config = GPTConfig(**{**TINY, "n_layer": 3}, layer_codes=["abc", "abb", "abc"])
    assert config.variant_label() == "abb/abc"


# ---- gates and pruning ---------------------------------------------------------------------------


def set_gates(model: GPT, logits: dict) -> None:
    """logits: {(layer, role): gate log-odds}; +8 is a gate of exactly 1, -8 a gate of exactly 0."""
    for (layer, role), value in logits.items():
        getattr(model.blocks[layer].attn, f"gate_{role}").data[:] = value


def test_gate_penalty_is_the_expected_number_of_open_gates():
    model = tiny_gpt(**labelled("abc+gate"))
    log_alphas = [float(getattr(b.attn, f"gate_{r}").data[0]) for b in model.blocks for r in "qkv"]
    # P(z > 0) = sigmoid(log_alpha - beta log(-gamma / zeta)), beta = 2/3, gamma = -0.1, zeta = 1.1
    expected = sum(1 / (1 + np.exp(-(a - 2 / 3 * np.log(0.1 / 1.1)))) for a in log_alphas)
    assert len(model.gates()) == 6
    assert float(model.gate_penalty().data) == pytest.approx(expected, rel=1e-12)


def test_gates_far_past_the_stretch_are_exactly_shut_or_open():
    model = tiny_gpt(**labelled("abc+gate"))
    set_gates(model, {(0, "q"): -2.5, (0, "k"): 2.5, (0, "v"): 0.0})
    gates = model.gates()
    assert (gates[(0, "q")], gates[(0, "k")]) == (0.0, 1.0)
    assert gates[(0, "v")] == pytest.approx(0.5)  # sigmoid(0) (zeta - gamma) + gamma


def test_pruned_model_computes_the_gated_models_deterministic_logits_with_gates_shut_open_and_between():
    model = tiny_gpt(**labelled("abc+gate"))
    set_gates(model, {(0, "q"): -8, (0, "k"): 8, (0, "v"): 0.4, (1, "q"): 8, (1, "k"): 8, (1, "v"): -8})
    ids = random_ids()
    pruned = model.prune()
    assert pruned.config.layer_codes == ["-ab", "ab-"]
    np.testing.assert_allclose(full_logits(pruned, ids), full_logits(model, ids), rtol=0, atol=1e-12)


def test_an_open_gate_leaves_its_weight_exactly_as_trained():
    model = tiny_gpt(**labelled("abc+gate"))
    set_gates(model, {(0, "q"): 8})
    assert np.array_equal(model.prune().blocks[0].attn.w_q.data, model.blocks[0].attn.w_q.data)


def test_projections_kept_counts_each_tied_matrix_once():
    assert tiny_gpt(layer_codes=["abc", "aab"]).projections_kept() == 5
    assert tiny_gpt(layer_codes=["---", "-a-"]).projections_kept() == 1


def test_gate_penalty_of_an_ungated_model_is_none():
    assert tiny_gpt().gate_penalty() is None


def test_prune_turns_low_gates_into_identity_and_keeps_high_ones():
    model = tiny_gpt(**labelled("abc+gate"))
    set_gates(model, {(0, "q"): 8, (0, "k"): -8, (0, "v"): 8, (1, "q"): -8, (1, "k"): -8, (1, "v"): -8})
    pruned = model.prune()
    assert pruned.config.layer_codes == ["a-b", "---"]
    assert not pruned.config.gate
    assert [b.attn.spec.code for b in pruned.blocks] == ["a-b", "---"]


def test_prune_drops_the_weights_of_identity_roles():
    model = tiny_gpt(**labelled("abc+gate"))
    set_gates(model, {(0, "q"): 8, (0, "k"): -8, (0, "v"): 8, (1, "q"): -8, (1, "k"): -8, (1, "v"): -8})
    pruned = model.prune()
    assert sorted(n for n, _ in pruned.blocks[0].attn.named_parameters()) == ["w_o", "w_q", "w_v"]
    assert [n for n, _ in pruned.blocks[1].attn.named_parameters()] == ["w_o"]
    dropped = 4 * WIDTH * WIDTH + 6  # w_k of layer 0, w_q, w_k, w_v of layer 1, six gates
    assert pruned.num_parameters() == model.num_parameters() - dropped
    x = Tensor(np.random.default_rng(2).standard_normal((1, 3, WIDTH)))
    x_heads = x.data.reshape(1, 3, 4, WIDTH // 4).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    assert np.array_equal(pruned.blocks[0].attn.project(x)[1].data, x_heads)  # K = x
    assert all(np.array_equal(t.data, x_heads) for t in pruned.blocks[1].attn.project(x))


def test_prune_folds_a_kept_gate_into_its_weight():
    model = tiny_gpt(**labelled("abc+gate"))
    attn = model.blocks[0].attn
    g = float(attn.gate("q").data[0])
    pruned = model.prune(threshold=0.0)
    expected = g * attn.w_q.data + (1 - g) * np.eye(WIDTH)  # x (g W + (1-g) I)
    np.testing.assert_allclose(pruned.blocks[0].attn.w_q.data, expected, rtol=0, atol=1e-15)


def test_prune_keeps_roles_tied_when_their_gates_are_equal():
    model = tiny_gpt(**labelled("aab+gate"))
    set_gates(model, {(i, r): 1.5 for i in range(2) for r in "qkv"})
    pruned = model.prune()
    assert pruned.config.layer_codes == ["aab", "aab"]
    assert "w_qk" in dict(pruned.blocks[0].attn.named_parameters())


def test_prune_unties_roles_whose_gates_differ():
    model = tiny_gpt(**labelled("aab+gate"))
    set_gates(model, {(0, "q"): 1.0, (0, "k"): 3.0, (0, "v"): 3.0})
    assert model.prune().config.layer_codes[0] == "abc"


@pytest.mark.parametrize("label", ["abc+gate", "aab+gate", "aaa+gate", "abb+gate+gqa2",
                                   "-ab+gate", "aab+rotate+pos2d+gate"])
def test_pruning_with_every_gate_kept_computes_what_the_gated_model_did(label):
    model = tiny_gpt(**labelled(label))
    ids = random_ids()
    pruned = model.prune(threshold=0.0)
    assert not pruned.config.gate
    np.testing.assert_allclose(full_logits(pruned, ids), full_logits(model, ids), rtol=0, atol=1e-12)


def test_prune_of_an_ungated_model_raises():
    with pytest.raises(ValueError, match="gate=True"):
        tiny_gpt().prune()


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(dtype="float16"), "dtype must be"),
    (dict(vocab_size=0), "vocab_size must be positive"),
    (dict(block_size=0), "block_size must be positive"),
    (dict(n_layer=0), "n_layer must be positive"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(dropout=-0.1), "dropout must be in"),
    (dict(n_embd=10, n_head=4), "multiple of n_head"),
    (dict(n_kv_head=3), "must divide n_head"),
    (dict(code="aab", n_kv_head=2), "cannot share one weight"),
    (dict(code="a-b", n_kv_head=1), "identity K"),
    (dict(code="abd"), "is not valid"),
    (dict(pos="absolute"), "pos must be one of 'learned', 'rope', 'alibi', 'none'"),
    (dict(pos="rope", n_embd=12, n_head=4), "head width n_embd / n_head = 3 must be even"),
    (dict(latent_kv=0), r"latent_kv must be a whole number >= 1"),
    (dict(latent_kv=2.5), r"latent_kv must be a whole number >= 1"),
    (dict(latent_kv=True), r"latent_kv must be a whole number >= 1"),
    (dict(code="aab", latent_kv=4), "Q shares its weight with K"),
    (dict(code="ab-", latent_kv=4), "V is the identity"),
    (dict(latent_kv=9), "latent_kv=9 is wider than n_embd=8"),
    (dict(code="---", gate=True), "code '---' has nothing to gate"),
    (dict(code="-ab", n_kv_head=1, gate=True), "code '-ab' has nothing to gate"),
    (dict(code="-ab", latent_kv=4, gate=True), "code '-ab' has nothing to gate"),
])
def test_invalid_configurations_raise_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **overrides})


def test_config_resolves_names_to_codes():
    assert GPTConfig(**TINY, code="shared-kv").code == "abb"
    assert GPTConfig(**TINY, layer_codes=["no-key", "bcc"]).layer_codes == ["a-b", "abb"]


@pytest.mark.parametrize("overrides, label", [
    (dict(code="abb", rotate=True), "abb+rotate"),
    (dict(code="abc", n_kv_head=1), "abc+mqa"),
    (dict(code="abb", n_kv_head=2), "abb+gqa2"),
    (dict(code="abc", n_kv_head=4), "abc"),
    (dict(code="aab", pos2d=True, gate=True), "aab+pos2d+gate"),
    (dict(code="abc", out_proj=False), "abc+no-out-proj"),
    (dict(code="aab", wide_init=True), "aab+wide-init"),
    (dict(code="abc", wide_init=True, sym_init=True), "abc+wide-init+sym-init"),
    (dict(code="abc", pos="rope"), "abc+rope"),
    (dict(code="abc", pos="none"), "abc+no-pos"),
    (dict(code="abb", out_gate=True, n_kv_head=1), "abb+out-gate+mqa"),
    (dict(code="abc", latent_kv=8), "abc+latent-kv8"),
    (dict(code="abb", rotate=True, gate=True, pos="rope", out_gate=True, latent_kv=4, n_kv_head=2, out_proj=False),
     "abb+rotate+gate+rope+out-gate+latent-kv4+gqa2+no-out-proj"),
])
def test_variant_label_names_the_code_and_its_modifiers(overrides, label):
    config = GPTConfig(**{**TINY, **overrides})
    assert config.variant_label() == label
    assert GPTConfig(**{**TINY, **GPTConfig.overrides_from_label(label)}).variant_label() == label


@pytest.mark.parametrize("modifier", ["spin", "latent-kv", "latent-kv0", "latent-kv-3", "rope2"])
def test_an_unknown_modifier_in_a_label_raises(modifier):
    with pytest.raises(ValueError, match=f"unknown modifier '{modifier}'"):
        GPTConfig.overrides_from_label("abb+" + modifier)


def test_a_label_gives_the_modern_modifier_overrides():
    overrides = GPTConfig.overrides_from_label("abc+rope+out-gate+latent-kv32")
    assert overrides == {"code": "abc", "pos": "rope", "out_gate": True, "latent_kv": 32}
    assert GPTConfig.overrides_from_label("abc+no-pos") == {"code": "abc", "pos": "none"}


def test_a_label_gives_the_code_and_modifier_overrides():
    overrides = GPTConfig.overrides_from_label("shared-kv+rotate+gqa2")
    assert overrides == {"code": "abb", "rotate": True, "n_kv_head": 2}


def test_wide_init_scales_only_the_projection_weights_to_one_over_root_width():
    """Same draws, another scale: q = x W keeps the scale of x (std 1/sqrt(C)) instead of 0.02."""
    config = dict(TINY, code="abc", n_embd=64, n_head=4)
    small, wide = GPT(GPTConfig(**config)), GPT(GPTConfig(**config, wide_init=True))
    for name, p in wide.named_parameters():
        base = dict(small.named_parameters())[name].data
        if name.rsplit(".", 1)[-1] in ("w_q", "w_k", "w_v"):
            np.testing.assert_allclose(p.data, base / 0.02 / np.sqrt(64))
            assert abs(p.data.std() * np.sqrt(64) - 1) < 0.1
        else:
            np.testing.assert_array_equal(p.data, base)


def test_sym_init_starts_w_k_as_a_copy_of_w_q_and_they_train_apart():
    model = GPT(GPTConfig(**TINY, code="abc", sym_init=True))
    attn = model.blocks[0].attn
    np.testing.assert_array_equal(attn.w_k.data, attn.w_q.data)
    assert not np.array_equal(attn.w_v.data, attn.w_q.data)
    x = np.arange(2 * BLOCK).reshape(2, BLOCK) % VOCAB
    _, loss = model(x, x)
    loss.backward()
    assert not np.allclose(attn.w_k.grad, attn.w_q.grad)  # a step moves them apart


@pytest.mark.parametrize("overrides, message", [
    (dict(code="aab"), "no separate learned W_q and W_k"),
    (dict(code="-ab"), "no separate learned W_q and W_k"),
    (dict(code="abc", n_kv_head=2), "needs K as wide as Q"),
])
def test_sym_init_needs_separate_learned_q_and_k_of_one_width(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **overrides, "sym_init": True})


def test_config_round_trips_through_a_dict():
    config = GPTConfig(**TINY, code="abb", rotate=True, n_kv_head=2)
    assert GPTConfig.from_dict(config.to_dict()) == config


def test_a_config_dict_without_pos_out_gate_and_latent_kv_takes_their_defaults():
    saved = GPTConfig(**TINY).to_dict()
    for key in ("pos", "out_gate", "latent_kv"):
        del saved[key]
    config = GPTConfig.from_dict(saved)
    assert (config.pos, config.out_gate, config.latent_kv) == ("learned", False, None)
    assert "position_embedding.weight" in dict(GPT(config).named_parameters())


def test_config_reads_the_keys_variant_and_layer_variants_as_code_and_layer_codes():
    aliased = {**TINY, "variant": "abb", "layer_variants": ["abc", "aab"]}
    config = GPTConfig.from_dict(aliased)
    assert config.layer_codes == ["abc", "aab"] and config.code == "abb"
    assert "variant" not in config.to_dict() and "layer_variants" not in config.to_dict()


def test_untied_head_has_its_own_output_embedding():
    tied = GPT(GPTConfig(**TINY))
    untied = GPT(GPTConfig(**TINY, tie_weights=False))
    assert untied.num_parameters() == tied.num_parameters() + VOCAB * WIDTH


def test_model_params_follow_the_dtype():
    model = GPT(GPTConfig(**{**TINY, "dtype": "float32"}))
    assert all(p.dtype == np.float32 for p in model.parameters())
    assert isinstance(model(random_ids())[0], Tensor)


# ---- weights edited while a graph reads them ----------------------------------------------------


def test_an_optimizer_step_between_forward_and_backward_makes_backward_refuse():
    from minqkv.optim import AdamW

    model, ids = tiny_gpt().train(), random_ids()
    opt = AdamW(model.named_parameters(), lr=1e-2)
    model(ids, ids)[1].backward()  # every parameter has a gradient, so the step writes every one
    _, loss = model(ids, ids)
    opt.step()
    with pytest.raises(RuntimeError, match="changed in place .* recompute the forward"):
        loss.backward()


def test_loading_weights_between_forward_and_backward_makes_backward_refuse():
    model, ids = tiny_gpt(), random_ids()
    _, loss = model(ids, ids)
    model.load_state_dict(tiny_gpt(seed=1).state_dict())
    with pytest.raises(RuntimeError, match="changed in place"):
        loss.backward()


def test_a_weight_read_by_a_graph_refuses_element_writes_until_backward_has_run():
    model, ids = tiny_gpt(), random_ids()
    w = model.blocks[0].attn.w_q
    _, loss = model(ids, ids)
    with pytest.raises(ValueError, match="read-only"):
        w.data[0, 0] = 5.0
    loss.backward()
    w.data[0, 0] = 5.0  # the graph is read: the weight is the model's again


def test_a_forward_without_a_graph_leaves_the_weights_writable():
    model, ids = tiny_gpt(), random_ids()
    with no_grad():
        model(ids, ids)
    assert all(p.data.flags.writeable for p in model.parameters())
