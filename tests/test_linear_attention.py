"""linear_attention.py: the feature maps, the chunked causal op, its naive twin, decoding with a state.

Gradients are checked three ways: finite differences (float64), the engine's gradient of the naive
quadratic form, and torch.autograd on an independent PyTorch implementation (the cumulative-sum form).

`python tests/test_linear_attention.py` prints the time and peak memory of the op against the fused
softmax attention at T = 1k..8k (printed, never asserted).
"""

import time
import tracemalloc

import numpy as np
import pytest

from minqkv import ops
from minqkv.lab.gradcheck import gradcheck
from minqkv.linear_attention import (LinearState, causal_linear_attention, causal_linear_attention_naive,
                                     draw_performer_projection, elu_features, linear_attention_decode,
                                     performer_features)
from minqkv.tensor import Tensor, no_grad


def normal(*shape, seed=0, scale=1.0, dtype=np.float64):
    return Tensor((scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype), requires_grad=True)


def positive(*shape, seed=0, dtype=np.float64):
    """Features as elu + 1 and performer give them: positive, so the denominators are well away from 0."""
    return Tensor((np.abs(np.random.default_rng(seed).standard_normal(shape)) + 0.5).astype(dtype),
                  requires_grad=True)


def attention_inputs(B=2, H=4, Hkv=2, T=7, m=3, dv=2, dtype=np.float64):
    return positive(B, H, T, m, dtype=dtype), positive(B, Hkv, T, m, seed=1, dtype=dtype), \
        normal(B, Hkv, T, dv, seed=2, dtype=dtype)


def chunked(chunk, eps=1e-6):
    return lambda q, k, v: causal_linear_attention(q, k, v, eps=eps, chunk=chunk)


# Feature maps.


def test_elu_features_are_x_plus_1_above_0_and_exp_x_below():
    x = Tensor(np.array([-3.0, -0.5, 0.0, 0.5, 800.0, -800.0]))
    np.testing.assert_allclose(elu_features(x).data, [np.exp(-3), np.exp(-0.5), 1.0, 1.5, 801.0, 0.0])


def test_elu_features_gradcheck():
    assert max(gradcheck(elu_features, [normal(2, 3, 5, 4)])) < 1e-8


def test_projection_has_the_asked_shape_dtype_and_is_reproducible():
    W = draw_performer_projection(8, 20, np.random.default_rng(3), np.float32)
    assert W.shape == (8, 20) and W.dtype == np.float32
    np.testing.assert_array_equal(W, draw_performer_projection(8, 20, np.random.default_rng(3), np.float32))


def test_projection_directions_are_orthogonal_within_each_block_of_d():
    d, m = 6, 15  # blocks of 6, 6 and 3 columns
    W = draw_performer_projection(d, m, np.random.default_rng(0))
    for start in range(0, m, d):
        block = W[:, start:start + d]
        gram = block.T @ block
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-12)


def test_projection_column_lengths_are_those_of_gaussian_vectors():
    d, m = 16, 4000  # |w|^2 ~ chi-squared with d degrees of freedom: mean d, variance 2d
    squared_lengths = np.sum(draw_performer_projection(d, m, np.random.default_rng(0)) ** 2, axis=0)
    assert abs(squared_lengths.mean() - d) < 5 * np.sqrt(2 * d / m)
    assert abs(squared_lengths.var() - 2 * d) < 0.2 * 2 * d


def test_performer_features_are_the_formula():
    x, W = normal(1, 2, 3, 4), draw_performer_projection(4, 5, np.random.default_rng(1))
    xs = x.data / 4 ** 0.25
    expected = np.exp(xs @ W - 0.5 * np.sum(xs ** 2, axis=-1, keepdims=True)) / np.sqrt(5)
    np.testing.assert_allclose(performer_features(x, W).data, expected, rtol=1e-13)


def test_performer_features_gradcheck():
    W = draw_performer_projection(4, 6, np.random.default_rng(1))
    assert max(gradcheck(lambda x: performer_features(x, W), [normal(2, 2, 5, 4)])) < 1e-8


def test_performer_kernel_estimate_is_unbiased():
    """The mean of phi(q) . phi(k) over many projections approaches exp(q . k / sqrt(d))."""
    d, draws = 8, 400
    q, k = normal(1, 1, 1, d, scale=0.5).data, normal(1, 1, 1, d, seed=1, scale=0.5).data
    rng = np.random.default_rng(0)
    estimates = []
    for _ in range(draws):
        W = draw_performer_projection(d, 16, rng)
        estimates.append(np.sum(performer_features(Tensor(q), W).data * performer_features(Tensor(k), W).data))
    exact = np.exp(np.sum(q * k) / np.sqrt(d))
    standard_error = np.std(estimates) / np.sqrt(draws)
    assert abs(np.mean(estimates) - exact) < 4 * standard_error


def softmax_vs_performer_error(m: int, seeds=range(4)) -> float:
    """Mean |y_performer - y_softmax| on one fixed input, averaged over projections."""
    d, T = 16, 24
    q, k, v = (normal(1, 2, T, d, seed=s, scale=0.7) for s in (10, 11, 12))
    with no_grad():
        exact = ops.causal_attention(q, k, v).data
        errors = []
        for seed in seeds:
            W = draw_performer_projection(d, m, np.random.default_rng(seed))
            y = causal_linear_attention(performer_features(q, W), performer_features(k, W), v)
            errors.append(np.abs(y.data - exact).mean())
    return float(np.mean(errors))


def test_performer_attention_approaches_softmax_attention_as_features_grow():
    # Monte Carlo with heavy-tailed (log-normal) weights: the error falls more slowly than 1/sqrt(m)
    # at first (seen: 0.105, 0.050, 0.018 for m = 8, 128, 2048), so the bounds are loose
    few, some, many = (softmax_vs_performer_error(m) for m in (8, 128, 2048))
    assert many < some / 1.5 < few / 1.5 ** 2
    assert many < 0.04


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("features", ["elu", "performer"])
def test_inputs_of_a_trained_models_scale_give_no_nan_or_inf(dtype, features):
    """|x| up to 5 per element, d = 32 (the heads of width 128 with 4 heads), through the op and back."""
    rng = np.random.default_rng(0)
    x_q, x_k = (Tensor(rng.uniform(-5, 5, (2, 2, 40, 32)).astype(dtype), requires_grad=True) for _ in range(2))
    v = Tensor(rng.uniform(-5, 5, (2, 2, 40, 32)).astype(dtype), requires_grad=True)
    if features == "elu":
        phi = elu_features
    else:
        W = draw_performer_projection(32, 64, np.random.default_rng(1), dtype)
        phi = lambda x: performer_features(x, W)  # noqa: E731
    y = causal_linear_attention(phi(x_q), phi(x_k), v, chunk=16)
    ops.sum(y * y).backward()
    for array in (y.data, x_q.grad, x_k.grad, v.grad):
        assert array.dtype == dtype and np.all(np.isfinite(array))


def test_performer_features_refuse_a_projection_whose_exp_could_overflow():
    W = np.full((4, 3), 7.0, np.float32)  # |w|^2 / 2 = 98 > log(float32 max) = 88.7
    with pytest.raises(ValueError, match="performer_features: projection .* could overflow float32"):
        performer_features(Tensor(np.zeros((1, 1, 2, 4), np.float32)), W)


# The causal op against its naive twin.


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_chunked_equals_naive_for_every_chunk_size(chunk):
    q, k, v = attention_inputs(T=7)  # 7 tokens: chunks of 2, 3 and 5 leave a short last chunk
    np.testing.assert_allclose(causal_linear_attention(q, k, v, chunk=chunk).data,
                               causal_linear_attention_naive(q, k, v).data, rtol=1e-12, atol=1e-14)


def gradients(fn, inputs, seed=5):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward(np.random.default_rng(seed).standard_normal(out.shape))
    return [x.grad.copy() for x in inputs]


@pytest.mark.parametrize("chunk", [1, 3, 4, 10])
def test_chunked_gradients_equal_the_engines_gradients_of_the_naive_form(chunk):
    inputs = attention_inputs(T=10)
    for ours, reference in zip(gradients(chunked(chunk), inputs), gradients(causal_linear_attention_naive, inputs)):
        np.testing.assert_allclose(ours, reference, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("H, Hkv, T, chunk, eps", [(4, 2, 7, 3, 1e-6), (2, 2, 5, 2, 1e-6), (3, 1, 6, 4, 1e-6),
                                                     (2, 1, 1, 3, 0.5)])
def test_causal_linear_attention_gradcheck(H, Hkv, T, chunk, eps):
    # one token: y = a v / (a + eps) depends on phi_q and phi_k only through eps, so a large eps there
    inputs = attention_inputs(H=H, Hkv=Hkv, T=T)
    assert max(gradcheck(chunked(chunk, eps), inputs)) < 1e-8


def test_gradcheck_through_performer_features():
    W = draw_performer_projection(4, 5, np.random.default_rng(2))

    def performer_attention(x_q, x_k, v):
        return causal_linear_attention(performer_features(x_q, W), performer_features(x_k, W), v, chunk=3)

    inputs = [normal(1, 4, 7, 4, scale=0.5), normal(1, 2, 7, 4, seed=1, scale=0.5), normal(1, 2, 7, 3, seed=2)]
    assert max(gradcheck(performer_attention, inputs)) < 1e-8


def test_query_head_h_reads_key_value_head_h_over_group_size():
    q, k, v = attention_inputs(H=6, Hkv=2, T=5)
    repeated = [Tensor(np.repeat(x.data, 3, axis=1)) for x in (k, v)]  # heads 0,0,0,1,1,1
    np.testing.assert_allclose(causal_linear_attention(q, k, v, chunk=2).data,
                               causal_linear_attention(Tensor(q.data), *repeated, chunk=2).data, rtol=1e-13)


def test_grouped_key_value_gradients_sum_over_the_query_heads_that_read_them():
    q, k, v = attention_inputs(H=4, Hkv=2, T=6)
    k4, v4 = (Tensor(np.repeat(x.data, 2, axis=1), requires_grad=True) for x in (k, v))
    grouped = gradients(chunked(4), [q, k, v])
    full = gradients(chunked(4), [q, k4, v4])
    np.testing.assert_allclose(grouped[1], full[1].reshape(2, 2, 2, 6, 3).sum(axis=2), rtol=1e-12)
    np.testing.assert_allclose(grouped[2], full[2].reshape(2, 2, 2, 6, 2).sum(axis=2), rtol=1e-12)


def test_output_is_causal():
    q, k, v = attention_inputs(T=9)
    changed = [Tensor(x.data.copy()) for x in (q, k, v)]
    for x in changed:
        x.data[:, :, 6:] += 1.0  # change tokens 6.. only
    before, after = causal_linear_attention(q, k, v, chunk=4).data, causal_linear_attention(*changed, chunk=4).data
    np.testing.assert_array_equal(before[:, :, :6], after[:, :, :6])
    assert not np.allclose(before[:, :, 6:], after[:, :, 6:])


def test_float32_stays_float32_and_agrees_with_float64():
    q, k, v = attention_inputs(T=9)
    q32, k32, v32 = attention_inputs(T=9, dtype=np.float32)
    y32 = causal_linear_attention(q32, k32, v32, chunk=4)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32.data, causal_linear_attention(q, k, v, chunk=4).data, rtol=1e-5, atol=1e-6)


def test_zero_features_give_zero_output_not_nan():
    q, k, v = attention_inputs(T=4)
    y = causal_linear_attention(Tensor(np.zeros(q.shape)), k, v)
    np.testing.assert_array_equal(y.data, 0.0)


# Decoding with a state of constant size.


def test_decoding_token_by_token_equals_the_full_op():
    q, k, v = attention_inputs(H=4, Hkv=2, T=9, m=5, dv=3)
    state = LinearState.empty(2, 2, 5, 3, np.float64)
    ys = []
    for t in range(9):
        y, state = linear_attention_decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        ys.append(y.data)
    np.testing.assert_allclose(np.concatenate(ys, axis=2), causal_linear_attention(q, k, v).data, rtol=1e-12)
    assert state.length == 9


def test_decoding_in_uneven_pieces_of_arrays_equals_the_full_op():
    q, k, v = attention_inputs(T=11)
    state, ys = LinearState.empty(2, 2, 3, 2), []
    for piece in [slice(0, 4), slice(4, 5), slice(5, 11)]:
        y, state = linear_attention_decode(q.data[:, :, piece], k.data[:, :, piece], v.data[:, :, piece], state,
                                           chunk=2)
        assert isinstance(y, np.ndarray)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, axis=2), causal_linear_attention(q, k, v).data, rtol=1e-12)


def test_decoding_leaves_the_given_state_unchanged_and_records_no_graph():
    q, k, v = attention_inputs(T=3)
    state = LinearState.empty(2, 2, 3, 2)
    y, new_state = linear_attention_decode(q, k, v, state)
    assert not y.requires_grad
    assert state.length == 0 and not state.S.any() and not state.z.any()
    assert new_state.length == 3


def test_state_bytes_do_not_grow_with_the_tokens_decoded():
    q, k, v = attention_inputs(T=12, m=4, dv=2)
    state = LinearState.empty(2, 2, 4, 2)
    sizes = []
    for t in range(12):
        _, state = linear_attention_decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        sizes.append(state.nbytes)
    assert set(sizes) == {(2 * 2 * 4 * 2 + 2 * 2 * 4) * 8}


# Input checks.


BAD_CALLS = [
    ("not a Tensor", lambda q, k, v: causal_linear_attention(q.data, k, v), TypeError, "phi_q must be a Tensor"),
    ("3-D v", lambda q, k, v: causal_linear_attention(q, k, v[0]), ValueError, "v must be 4-D"),
    ("dtypes mixed", lambda q, k, v: causal_linear_attention(q, Tensor(k.data.astype(np.float32)), v),
     TypeError, "phi_k is float32 but phi_q is float64"),
    ("features differ", lambda q, k, v: causal_linear_attention(q, k[..., :2], v), ValueError,
     "phi_k has shape .* needs"),
    ("tokens differ", lambda q, k, v: causal_linear_attention(q, k, v[:, :, :3]), ValueError,
     "v has shape .* needs"),
    ("heads do not divide", lambda q, k, v: causal_linear_attention(q[:, :3], k, v), ValueError,
     "phi_q has 3 heads and phi_k 2"),
    ("eps = 0", lambda q, k, v: causal_linear_attention(q, k, v, eps=0.0), ValueError, "eps must be a number > 0"),
    ("eps < 0", lambda q, k, v: causal_linear_attention(q, k, v, eps=-1e-6), ValueError, "eps must be"),
    ("chunk 0", lambda q, k, v: causal_linear_attention(q, k, v, chunk=0), ValueError, "chunk must be"),
    ("int features", lambda q, k, v: causal_linear_attention(Tensor(np.ones(q.shape, int)), k, v), TypeError,
     "phi_q must be float32 or float64"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_attention_inputs_raise_errors_naming_the_argument(call, error, message):
    with pytest.raises(error, match="causal_linear_attention: " + message):
        call(*attention_inputs())


@pytest.mark.parametrize("changed, error, message", [
    ({"d": 0}, ValueError, "d must be a whole number >= 1"),
    ({"m": 2.5}, ValueError, "m must be a whole number >= 1"),
    ({"rng": 7}, TypeError, "rng must be a numpy.random.Generator"),
    ({"dtype": np.int64}, TypeError, "dtype must be float32 or float64"),
])
def test_bad_projection_arguments_raise_naming_them(changed, error, message):
    arguments = {"d": 4, "m": 4, "rng": np.random.default_rng(0), "dtype": np.float64, **changed}
    with pytest.raises(error, match="draw_performer_projection: " + message):
        draw_performer_projection(**arguments)


@pytest.mark.parametrize("projection, error, message", [
    (np.ones((3, 2)), ValueError, r"projection has shape \(3, 2\) but x .* needs \(4, m\)"),
    (np.ones((4, 2), np.float32), TypeError, "projection is float32 but x is float64"),
    ([[1.0, 2.0]] * 4, TypeError, "projection must be a NumPy array"),
])
def test_bad_projection_raises_naming_it(projection, error, message):
    with pytest.raises(error, match="performer_features: " + message):
        performer_features(normal(1, 1, 2, 4), projection)


def test_decode_refuses_a_state_of_other_shape_or_dtype():
    q, k, v = attention_inputs()
    with pytest.raises(ValueError, match="linear_attention_decode: state holds S"):
        linear_attention_decode(q, k, v, LinearState.empty(2, 2, 4, 2))
    with pytest.raises(TypeError, match="linear_attention_decode: state is float32 but v is float64"):
        linear_attention_decode(q, k, v, LinearState.empty(2, 2, 3, 2, np.float32))
    with pytest.raises(TypeError, match="state must be a LinearState"):
        linear_attention_decode(q, k, v, None)
    with pytest.raises(ValueError, match="no new tokens"):
        linear_attention_decode(q[:, :, :0], k[:, :, :0], v[:, :, :0], LinearState.empty(2, 2, 3, 2))


# An independent PyTorch implementation: the cumulative-sum form, grouped heads by repeat_interleave.

torch = pytest.importorskip("torch")


def torch_elu_features(x):
    return torch.nn.functional.elu(x) + 1


def torch_performer_features(x, W):
    d, m = W.shape
    xs = x / d ** 0.25
    return torch.exp(xs @ W - (xs * xs).sum(-1, keepdim=True) / 2) / m ** 0.5


def torch_causal_linear_attention(phi_q, phi_k, v, eps=1e-6):
    group = phi_q.shape[1] // phi_k.shape[1]
    phi_k, v = phi_k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    S = torch.cumsum(phi_k[..., :, None] * v[..., None, :], dim=2)  # (B, H, T, m, dv): S_t for every t
    z = torch.cumsum(phi_k, dim=2)  # (B, H, T, m)
    numerator = torch.einsum("bhtm,bhtmd->bhtd", phi_q, S)
    return numerator / ((phi_q * z).sum(-1, keepdim=True) + eps)


def compare_with_torch(ours, theirs, inputs):
    torch_inputs = [torch.tensor(x.data, requires_grad=True) for x in inputs]
    expected = theirs(*torch_inputs)
    upstream = np.random.default_rng(9).standard_normal(expected.shape)
    expected.backward(torch.from_numpy(upstream))
    for x in inputs:
        x.grad = None
    out = ours(*inputs)
    out.backward(upstream)
    np.testing.assert_allclose(out.data, expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    for x, t in zip(inputs, torch_inputs):
        np.testing.assert_allclose(x.grad, t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_causal_linear_attention_matches_torch():
    compare_with_torch(chunked(3), torch_causal_linear_attention, list(attention_inputs(H=4, Hkv=2, T=8)))


def test_elu_attention_matches_torch():
    def ours(x_q, x_k, v):
        return causal_linear_attention(elu_features(x_q), elu_features(x_k), v, chunk=4)

    def theirs(x_q, x_k, v):
        return torch_causal_linear_attention(torch_elu_features(x_q), torch_elu_features(x_k), v)

    compare_with_torch(ours, theirs, [normal(2, 4, 9, 5), normal(2, 1, 9, 5, seed=1), normal(2, 1, 9, 3, seed=2)])


def test_performer_attention_matches_torch():
    W = draw_performer_projection(6, 10, np.random.default_rng(4))

    def ours(x_q, x_k, v):
        return causal_linear_attention(performer_features(x_q, W), performer_features(x_k, W), v, chunk=4)

    def theirs(x_q, x_k, v):
        Wt = torch.from_numpy(W)
        return torch_causal_linear_attention(torch_performer_features(x_q, Wt), torch_performer_features(x_k, Wt), v)

    compare_with_torch(ours, theirs, [normal(2, 2, 9, 6), normal(2, 2, 9, 6, seed=1), normal(2, 2, 9, 3, seed=2)])


# Cost: printed, never asserted (machines are noisy).


def measure(fn, inputs, repeats=3) -> tuple:
    """Seconds (the best of a few runs) and peak bytes of NumPy arrays allocated (traced) by one forward
    and backward pass, the inputs not counted."""
    best, peak = np.inf, 0
    for _ in range(repeats):
        for x in inputs:
            x.grad = None
        tracemalloc.start()
        start = time.perf_counter()
        out = fn(*inputs)
        out.backward(np.ones(out.shape, out.dtype))
        best = min(best, time.perf_counter() - start)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del out
    return best, peak


def cost_table(T_values=(1024, 2048, 4096, 8192), m_values=(32, 64), hd=32, dtype=np.float32) -> str:
    """One head of width hd: the fused softmax attention against linear attention with m features."""
    rows = [f"{'T':>5}  {'kind':<26} {'fwd+bwd s':>9}  {'peak MiB':>8}"]
    for T in T_values:
        q, k, v = (normal(1, 1, T, hd, seed=s, dtype=dtype) for s in range(3))
        seconds, peak = measure(ops.causal_attention, [q, k, v])
        rows.append(f"{T:>5}  {'softmax (fused)':<26} {seconds:>9.3f}  {peak / 2 ** 20:>8.2f}")
        for m in m_values:
            phi_q, phi_k = positive(1, 1, T, m, dtype=dtype), positive(1, 1, T, m, seed=1, dtype=dtype)
            seconds, peak = measure(causal_linear_attention, [phi_q, phi_k, v])
            rows.append(f"{T:>5}  {f'linear m={m} (chunk 64)':<26} {seconds:>9.3f}  {peak / 2 ** 20:>8.2f}")
    return "\n".join(rows)


def test_cost_table_runs_and_has_a_row_per_kind():
    assert len(cost_table(T_values=(64,), m_values=(8,)).splitlines()) == 3  # header, softmax, linear


if __name__ == "__main__":
    print(cost_table())
