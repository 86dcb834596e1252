"""minqkv.kernels.layers and .adamw: GELU, layer norm, cross-entropy, embedding backward and the AdamW
update, C against the NumPy twins.

The property tests draw shapes and values with hypothesis and compare minqkv_*_c with *_numpy
(skipped without the C core); the behaviour tests run on every backend. The kernels check their
arrays; values (targets and ids in range, eps) are checked by the ops (tests/test_ops.py), and C
refuses an index outside its table by itself. The float64 gradient checks of the ops built on
these kernels are in minqkv/lab/op_checks.py (gelu, layer_norm, cross_entropy, embedding), which
tests/test_gradcheck.py runs.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minqkv import kernels
from minqkv.kernels import runtime

needs_c = pytest.mark.skipif(not kernels.HAVE_C,
                             reason="the C extension minqkv._ccore is not built (pip install -e .)")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6), np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13)}


@st.composite
def arrays(draw, min_rows=0, max_cols=70):
    """(rows, cols) arrays of either dtype, large enough sometimes to run on several threads."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rows = draw(st.one_of(st.integers(min_rows, 9), st.sampled_from([600, 1200])))
    cols = draw(st.integers(1, max_cols))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.standard_normal((rows, cols)) * scale).astype(dtype), rng


@pytest.fixture
def threads():
    before = kernels.get_num_threads()
    yield kernels.set_num_threads
    kernels.set_num_threads(before)


# ---- GELU --------------------------------------------------------------------------------------


@needs_c
@FAST
@given(arrays())
def test_gelu_c_matches_numpy_twin(case):
    x, rng = case
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    # 1 + tanh(u) cancels for u << 0 in both versions: its rounding error is relative to |x|
    tolerance = dict(TOLERANCE[x.dtype], atol=TOLERANCE[x.dtype]["atol"] * max(1, np.abs(x).max(initial=0)))
    np.testing.assert_allclose(kernels.gelu_c(x), kernels.gelu_numpy(x), **tolerance)
    np.testing.assert_allclose(kernels.gelu_backward_c(x, dy), kernels.gelu_backward_numpy(x, dy),
                               **tolerance)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x^3 of 1e30 in the twin
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_is_zero_at_zero_identity_far_right_and_zero_far_left(backend, dtype):
    x = np.array([0.0, 50.0, -50.0, 1e30, -1e30], dtype)
    np.testing.assert_array_equal(kernels.gelu(x), np.array([0.0, 50.0, 0.0, 1e30, 0.0], dtype))


def test_gelu_backward_needs_matching_shapes(backend):
    with pytest.raises(ValueError, match="gelu_backward: x has shape"):
        kernels.gelu_backward(np.zeros(3), np.zeros(4))


# ---- layer norm ---------------------------------------------------------------------------------


@needs_c
@FAST
@given(arrays(), st.booleans())
def test_layer_norm_c_matches_numpy_twin(case, with_bias):
    x, rng = case
    C = x.shape[-1]
    weight = rng.standard_normal(C).astype(x.dtype)
    bias = rng.standard_normal(C).astype(x.dtype) if with_bias else None
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    got, want = kernels.layer_norm_c(x, weight, bias), kernels.layer_norm_numpy(x, weight, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOLERANCE[x.dtype])
    _, mean, rstd = want
    got = kernels.layer_norm_backward_c(x, weight, mean, rstd, dy, with_bias)
    want = kernels.layer_norm_backward_numpy(x, weight, mean, rstd, dy, with_bias)
    # dx is a difference of terms of size rstd * |dy * weight| that may cancel (exactly, for C = 2);
    # dweight and dbias are sums down the rows
    rtol = TOLERANCE[x.dtype]["rtol"] * np.sqrt(x.shape[0] + 1)
    sizes = (np.abs(rstd * dy * weight).max(initial=1), np.abs(want[1]).max(initial=1),
             np.abs(dy).sum(axis=0).max(initial=1))
    for g, w, size in zip(got, want, sizes):
        if w is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * size)


def test_layer_norm_of_a_row_far_from_zero_keeps_its_digits(backend):
    x = (1e4 + np.arange(8, dtype=np.float32)).reshape(1, 8)
    y, _, _ = kernels.layer_norm(x, np.ones(8, np.float32), None, eps=0.0)
    centered = np.arange(8) - 3.5
    np.testing.assert_allclose(y[0], centered / centered.std(), rtol=1e-5)


def test_layer_norm_weight_of_the_wrong_width_is_named(backend):
    with pytest.raises(ValueError, match=r"layer_norm: weight has shape \(4,\) but x \(2, 3\) needs \(3,\)"):
        kernels.layer_norm(np.zeros((2, 3)), np.ones(4), None)


# ---- cross-entropy ---------------------------------------------------------------------------------


@needs_c
@FAST
@given(arrays(max_cols=80), st.floats(0.01, 2.0))
def test_cross_entropy_c_matches_numpy_twin(case, scale):
    logits, rng = case
    rows, V = logits.shape
    targets = rng.integers(-1, V, rows)  # -1: ignored
    got = kernels.cross_entropy_c(logits, targets, -1, scale)
    want = kernels.cross_entropy_numpy(logits, targets, -1, scale)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOLERANCE[logits.dtype])
    losses, dlogits = kernels.cross_entropy_c(logits, targets, -1, scale, want_grad=False)
    assert dlogits is None
    np.testing.assert_allclose(losses, want[0], **TOLERANCE[logits.dtype])


def test_cross_entropy_of_uniform_logits_is_log_v_and_ignored_rows_are_zero(backend):
    losses, dlogits = kernels.cross_entropy(np.zeros((3, 4)), np.array([0, -1, 3]), ignore_index=-1)
    np.testing.assert_allclose(losses, [np.log(4), 0, np.log(4)])
    np.testing.assert_allclose(dlogits[1], 0)
    np.testing.assert_allclose(dlogits[0], [-0.75, 0.25, 0.25, 0.25])


def test_cross_entropy_targets_of_the_wrong_length_are_named(backend):
    with pytest.raises(ValueError, match=r"cross_entropy: targets have shape \(3,\) but logits \(2, 4\) need \(2,\)"):
        kernels.cross_entropy(np.zeros((2, 4)), np.array([1, 0, 2]))


# ---- embedding backward -------------------------------------------------------------------------


@needs_c
@FAST
@given(arrays(), st.integers(1, 70))
def test_embedding_backward_c_matches_numpy_twin(case, n):
    rows, rng = case
    ids = rng.integers(0, rng.integers(1, n + 1), rows.shape[0])  # often a few ids, repeated, in any order
    # C adds in position order, NumPy's reduceat pairwise: the rounding of a sum grows with its terms
    largest = max(1, np.abs(rows).max(initial=0))
    rounding = (1e-6 if rows.dtype == np.float32 else 1e-14) * max(1, rows.shape[0]) * largest
    np.testing.assert_allclose(kernels.embedding_backward_c(ids, rows, n),
                               kernels.embedding_backward_numpy(ids, rows, n), rtol=0, atol=rounding)


def test_embedding_backward_sums_each_ids_rows_and_leaves_unused_ids_zero(backend):
    rows = np.arange(8.0).reshape(4, 2)
    out = kernels.embedding_backward(np.array([2, 0, 2, 2]), rows, 4)
    np.testing.assert_array_equal(out, [[2, 3], [0, 0], [0 + 4 + 6, 1 + 5 + 7], [0, 0]])
    assert kernels.embedding_backward(np.zeros(0, np.int64), np.zeros((0, 3)), 2).tolist() == [[0] * 3] * 2


@pytest.mark.parametrize("ids, rows, n, error, message", [
    (np.array([0.0, 1.0]), np.ones((2, 3)), 5, TypeError, "ids must be a numpy array of integers"),
    (np.array([0, 1, 2]), np.ones((2, 3)), 5, ValueError, r"ids have shape \(3,\) but rows \(2, 3\) need \(2,\)"),
    (np.array([0, 1]), np.ones(2), 5, ValueError, "rows must be 2-D"),
    (np.array([0, 1]), np.ones((2, 3), np.int64), 5, TypeError, "rows has dtype int64"),
    (np.array([0, 1]), np.ones((2, 3)), -1, ValueError, "n .* must be an integer >= 0, got -1"),
])
def test_embedding_backward_refuses_bad_arguments_by_name(backend, ids, rows, n, error, message):
    with pytest.raises(error, match="embedding_backward: " + message):
        kernels.embedding_backward(ids, rows, n)


@needs_c
def test_embedding_backward_in_c_refuses_an_id_outside_the_table_by_itself():
    # called directly, past the Python checks: C must not write outside out
    ids, rows, out = np.array([0, 3], np.int64), np.ones((2, 4)), np.zeros((3, 4))
    P = runtime.pointer
    status = runtime.lib.minqkv_embedding_backward_f64(P(ids), P(rows), P(out), 2, 4, 3)
    assert status != 0 and not out.any()


@needs_c
@pytest.mark.parametrize("call", [
    lambda: kernels.cross_entropy_c(np.zeros((2, 4)), np.array([1, 7])),  # a target past V = 4
    lambda: kernels.cross_entropy_c(np.zeros((2, 4)), np.array([-2, 0])),  # nor ignore_index (-1)
    lambda: kernels.embedding_backward_c(np.array([0, 5]), np.ones((2, 3)), 5),  # an id past n = 5
    lambda: kernels.embedding_backward_c(np.array([-1, 0]), np.ones((2, 3)), 5),
], ids=["target past V", "negative target", "id past n", "negative id"])
def test_a_c_kernel_given_an_index_outside_its_table_refuses_instead_of_reading_past_it(call):
    # the kernels leave values to their callers (ops.py checks ids and targets); C still refuses
    with pytest.raises(RuntimeError, match="the C core refused its arguments"):
        call()


# ---- AdamW ----------------------------------------------------------------------------------------


def _adamw_state(rng, n, dtype):
    param, grad, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    return param, grad, m, np.abs(rng.standard_normal(n)).astype(dtype)


@needs_c
@FAST
@given(st.sampled_from([np.float32, np.float64]), st.sampled_from([0, 1, 17, 1000, 300_000]),
       st.integers(1, 50), st.booleans(), st.integers(0, 2**32 - 1))
def test_adamw_update_c_matches_numpy_twin(dtype, n, t, decay, seed):
    rng = np.random.default_rng(seed)
    ours = _adamw_state(rng, n, dtype)
    twin = tuple(a.copy() for a in ours)
    lr, beta1, beta2 = 3e-3, 0.9, 0.95
    hyper = dict(beta1=beta1, beta2=beta2, decay_factor=1 - lr * 0.1 if decay else 1.0,
                 step_size=lr / (1 - beta1**t), bias2_sqrt=np.sqrt(1 - beta2**t), eps=1e-8)
    kernels.adamw_update_c(*ours, **hyper)
    kernels.adamw_update_numpy(*twin, **hyper)
    for name, g, w in zip(("param", "grad", "m", "v"), ours, twin):
        # p * decay - step * update cancels where the two are close: compare against the array's size
        size = np.abs(w).max(initial=1)
        np.testing.assert_allclose(g, w, rtol=1e-5 if dtype == np.float32 else 1e-14,
                                   atol=size * (1e-6 if dtype == np.float32 else 1e-15), err_msg=name)


def test_adamw_update_of_a_strided_parameter_still_updates_it_in_place(backend):
    rng = np.random.default_rng(0)
    param, grad, m, v = _adamw_state(rng, (4, 6), np.float32)
    strided = param[:, ::2]
    want = tuple(a.copy() for a in (strided, grad[:, ::2], m[:, ::2], v[:, ::2]))
    hyper = dict(beta1=0.9, beta2=0.95, decay_factor=0.999, step_size=1e-2, bias2_sqrt=0.3, eps=1e-8)
    kernels.adamw_update(strided, grad[:, ::2], m[:, ::2], v[:, ::2], **hyper)
    kernels.adamw_update_numpy(*want, **hyper)
    np.testing.assert_allclose(param[:, ::2], want[0], rtol=1e-6)


def test_adamw_update_refuses_a_read_only_moment(backend):
    param, grad, m, v = _adamw_state(np.random.default_rng(0), 5, np.float64)
    v.flags.writeable = False
    with pytest.raises(ValueError, match="adamw_update: v is updated in place but is read-only"):
        kernels.adamw_update(param, grad, m, v, 0.9, 0.95, 1.0, 1e-3, 0.5, 1e-8)


@needs_c
@FAST
@given(arrays())
def test_add_c_gives_the_numpy_twins_bits(case):
    a, rng = case
    b = rng.standard_normal(a.shape).astype(a.dtype)
    np.testing.assert_array_equal(kernels.add_c(a, b), kernels.add_numpy(a, b))  # one rounding each: the same
    np.testing.assert_array_equal(kernels.add_c(a.T, b.T), a.T + b.T)  # strided: copied, then added


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_add_names_arrays_that_do_not_fit(backend):
    if backend == "c" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built (pip install -e .)")
    add = kernels.KERNELS[backend]["add"]
    with pytest.raises(ValueError, match=r"add: a has shape \(2, 3\) but b has shape \(3,\)"):
        add(np.ones((2, 3)), np.ones(3))
    with pytest.raises(TypeError, match="add: a is float64 but b is float32"):
        add(np.ones(3), np.ones(3, np.float32))


@needs_c
@FAST
@given(arrays())
def test_column_sums_c_matches_numpy_twin(case):
    x, _ = case
    got, want = kernels.column_sums_c(x), kernels.column_sums_numpy(x)
    assert got.shape == want.shape == x.shape[1:] and got.dtype == x.dtype
    rtol = TOLERANCE[x.dtype]["rtol"] * np.sqrt(x.shape[0] + 1)  # sums of up to 1200 rows, in another order
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(x).sum(axis=0).max(initial=1))


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_column_sums_of_no_rows_are_zeros_and_a_wrong_shape_is_named(backend):
    if backend == "c" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built (pip install -e .)")
    column_sums = kernels.KERNELS[backend]["column_sums"]
    np.testing.assert_array_equal(column_sums(np.empty((0, 3), np.float32)), np.zeros(3, np.float32))
    assert column_sums(np.empty((4, 0))).shape == (0,)
    np.testing.assert_array_equal(column_sums(np.arange(6.0).reshape(3, 2)[:, ::-1]), [9.0, 6.0])  # strided
    with pytest.raises(ValueError, match=r"column_sums: x must be 2-D \(rows, cols\), got shape \(3,\)"):
        column_sums(np.ones(3))
    with pytest.raises(TypeError, match="column_sums"):
        column_sums(np.ones((3, 2), np.int64))


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_kernels_give_the_same_bits_on_any_thread_count(dtype, threads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1500, 128)).astype(dtype)
    weight, dy = rng.standard_normal(128).astype(dtype), rng.standard_normal(x.shape).astype(dtype)
    targets = rng.integers(0, 128, 1500)
    results = []
    for n in (1, 2, 3):
        threads(n)
        y, mean, rstd = kernels.layer_norm_c(x, weight, weight)
        results.append([kernels.gelu_c(x), kernels.gelu_backward_c(x, dy), y,
                        *kernels.layer_norm_backward_c(x, weight, mean, rstd, dy), kernels.column_sums_c(dy),
                        *kernels.cross_entropy_c(x, targets, -1, 0.5)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
