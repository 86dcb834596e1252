"""minqkv.kernels.fused_attention with a causal sliding window (window=W): each query sees only
the last W keys up to its own position, i + (Tk - T) - W < j <= i + (Tk - T).

The C core against its NumPy twin and its row-by-row reference, forward and backward; the twin's
gradients against finite differences; the window's meaning against plain attention over each
query's W keys; bad windows refused; and, without timing anything, that the C core skips the keys
outside the windows: NaN planted there never reaches a result.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minqkv import kernels

needs_c = pytest.mark.skipif(not kernels.HAVE_C,
                             reason="the C extension minqkv._ccore is not built (pip install -e .)")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {np.dtype(np.float32): dict(rtol=1e-4, atol=2e-5), np.dtype(np.float64): dict(rtol=1e-11, atol=1e-12)}
KERNEL_ROUTES = ("attention_numpy", "attention_c", "attention_naive_c")


def random_case(rng, dtype, B, H, Hkv, T, Tk, hd, with_bias=False):
    """q (B, H, T, hd), k, v (B, Hkv, Tk, hd), bias (H, T, Tk) or None, dy like q."""
    q = rng.standard_normal((B, H, T, hd)).astype(dtype)
    k, v = (rng.standard_normal((B, Hkv, Tk, hd)).astype(dtype) for _ in range(2))
    bias = rng.standard_normal((H, T, Tk)).astype(dtype) if with_bias else None
    return q, k, v, bias, rng.standard_normal(q.shape).astype(dtype)


@st.composite
def window_cases(draw):
    """A case and a window: short sequences up to past one key tile (64) and some of several tiles,
    a cache longer than the queries (Tk > T, decoding), grouped heads, head widths on both sides of
    the tiled passes' limit (64), and windows of one key, a few keys, one or two tiles of keys, and
    as many as there are keys or more."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    T = draw(st.one_of(st.integers(1, 70), st.integers(1, 70), st.sampled_from([130, 300])))
    Tk = T + draw(st.sampled_from([0, 0, 1, 5, 70]))
    hd = draw(st.sampled_from([1, 8, 32, 65]))
    window = draw(st.one_of(st.just(1), st.integers(2, 40), st.integers(60, 140), st.just(Tk), st.just(Tk + 3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    case = random_case(rng, dtype, draw(st.integers(1, 2)), H, Hkv, T, Tk, hd, draw(st.booleans()))
    return case, window


def assert_gradients_close(got, want, tolerance):
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        if w is None:
            assert g is None, name
        else:
            size = np.abs(w).max(initial=1)  # sums over keys and queries: compare to their size
            np.testing.assert_allclose(g, w, rtol=tolerance["rtol"], atol=tolerance["atol"] * size, err_msg=name)


@needs_c
@FAST
@given(window_cases())
def test_windowed_attention_c_matches_numpy_twin_and_the_row_by_row_reference(case_and_window):
    (q, k, v, bias, dy), window = case_and_window
    tolerance = TOLERANCE[q.dtype]
    y_twin, lse_twin = kernels.attention_numpy(q, k, v, bias, window=window)
    for route in (kernels.attention_c, kernels.attention_naive_c):
        y, lse = route(q, k, v, bias, window=window)
        np.testing.assert_allclose(y, y_twin, **tolerance, err_msg=route.__name__)
        np.testing.assert_allclose(lse, lse_twin, **tolerance, err_msg=route.__name__)
    grads = kernels.attention_backward_c(q, k, v, bias, y_twin, lse_twin, dy, window=window)
    twins = kernels.attention_backward_numpy(q, k, v, bias, y_twin, lse_twin, dy, window=window)
    assert_gradients_close(grads, twins, tolerance)


def plain_attention_of_one_query(q_i, k, v, bias_row, scale):
    """softmax(scale q_i k^T + bias_row) v over the keys given, all visible."""
    scores = scale * k @ q_i + (bias_row if bias_row is not None else 0)
    weights = np.exp(scores - scores.max())
    return weights @ v / weights.sum()


@pytest.mark.parametrize("route", KERNEL_ROUTES)
@pytest.mark.parametrize("T, Tk, window", [(9, 9, 3), (9, 14, 4), (4, 20, 2), (1, 30, 5), (6, 6, 1)])
def test_each_query_attends_to_exactly_its_last_w_keys(route, T, Tk, window):
    if route != "attention_numpy" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built")
    rng = np.random.default_rng(T * 100 + Tk)
    q, k, v, bias, _ = random_case(rng, np.float64, 1, 2, 1, T, Tk, 4, with_bias=True)
    y, _ = getattr(kernels, route)(q, k, v, bias, window=window)
    for h in range(2):
        for i in range(T):
            last = i + Tk - T  # the query's own position
            first = max(0, last - window + 1)
            want = plain_attention_of_one_query(q[0, h, i], k[0, 0, first:last + 1], v[0, 0, first:last + 1],
                                                bias[h, i, first:last + 1], 0.5)
            np.testing.assert_allclose(y[0, h, i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", KERNEL_ROUTES)
def test_a_window_of_one_key_returns_each_querys_own_value(route):
    if route != "attention_numpy" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built")
    rng = np.random.default_rng(1)
    q, k, v, _, _ = random_case(rng, np.float64, 2, 2, 2, 5, 8, 3)
    y, lse = getattr(kernels, route)(q, k, v, window=1)
    np.testing.assert_allclose(y, v[:, :, 3:], rtol=1e-14)
    np.testing.assert_allclose(lse, (q * k[:, :, 3:]).sum(-1) / np.sqrt(3), rtol=1e-13)


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hd", [16, 65])
@pytest.mark.parametrize("T, Tk", [(1, 1), (70, 70), (130, 130), (40, 110)])
def test_a_window_as_long_as_the_keys_gives_full_attention_to_the_bit(dtype, hd, T, Tk):
    rng = np.random.default_rng(2)
    q, k, v, bias, dy = random_case(rng, dtype, 2, 2, 1, T, Tk, hd, with_bias=True)
    for route in ("attention_c", "attention_naive_c", "attention_numpy"):
        full = getattr(kernels, route)(q, k, v, bias)
        for window in (Tk, Tk + 1, 10**9, None):
            for got, want in zip(getattr(kernels, route)(q, k, v, bias, window=window), full):
                np.testing.assert_array_equal(got, want, err_msg=f"{route} window={window}")
    y, lse = kernels.attention_c(q, k, v, bias)
    for backward in (kernels.attention_backward_c, kernels.attention_backward_numpy):
        full = backward(q, k, v, bias, y, lse, dy)
        for got, want in zip(backward(q, k, v, bias, y, lse, dy, window=Tk), full):
            np.testing.assert_array_equal(got, want, err_msg=backward.__name__)


def finite_difference(f, x, step=1e-6):
    """d f / d x by central differences, element by element (x is changed and restored in place)."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + step
        up = f()
        x[index] = saved - step
        down = f()
        x[index] = saved
        grad[index] = (up - down) / (2 * step)
    return grad


@pytest.mark.parametrize("T, Tk, window", [(6, 6, 3), (5, 9, 2), (4, 4, 1), (3, 7, 10)])
def test_numpy_twin_gradients_match_finite_differences_in_float64(T, Tk, window):
    rng = np.random.default_rng(3)
    q, k, v, bias, r = random_case(rng, np.float64, 2, 2, 1, T, Tk, 3, with_bias=True)

    def loss():  # sum(y * r): its gradient with respect to y is r
        return (kernels.attention_numpy(q, k, v, bias, window=window)[0] * r).sum()

    y, lse = kernels.attention_numpy(q, k, v, bias, window=window)
    grads = kernels.attention_backward_numpy(q, k, v, bias, y, lse, r, window=window)
    for name, x, grad in zip(("dq", "dk", "dv", "dbias"), (q, k, v, bias), grads):
        np.testing.assert_allclose(grad, finite_difference(loss, x), rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("route", ["attention", "attention_backward"])
@pytest.mark.parametrize("window, error, message", [
    (-1, ValueError, "window must be >= 0 keys"),
    (1.5, TypeError, "window must be a whole number of keys"),
    (2.0, TypeError, "window must be a whole number of keys"),
    (True, TypeError, "window must be a whole number of keys"),
    ("3", TypeError, "window must be a whole number of keys"),
])
def test_bad_windows_are_refused_by_name(backend, route, window, error, message):
    q = np.zeros((1, 1, 3, 4))
    arguments = (q, q, q, None) + ((q, np.zeros((1, 1, 3)), q) if route == "attention_backward" else ())
    with pytest.raises(error, match=message):
        getattr(kernels, route)(*arguments, window=window)


@needs_c
@pytest.mark.parametrize("shape", [(1, 1, 0, 4), (0, 2, 3, 4)])
def test_windowed_attention_c_of_no_queries_or_no_batch_is_empty(shape):
    q = np.zeros(shape)
    y, lse = kernels.attention_c(q, q, q, window=2)
    assert y.shape == shape and lse.shape == shape[:3]
    grads = kernels.attention_backward_c(q, q, q, None, y, lse, q, window=2)
    assert [g.shape for g in grads[:3]] == [shape] * 3


@needs_c
def test_the_row_by_row_reference_refuses_bad_windows_too():
    q = np.zeros((1, 1, 3, 4))
    with pytest.raises(ValueError, match="window must be >= 0"):
        kernels.attention_naive_c(q, q, q, window=-2)


def test_a_numpy_integer_window_is_a_window(backend):
    rng = np.random.default_rng(4)
    q, k, v, _, _ = random_case(rng, np.float64, 1, 1, 1, 6, 6, 4)
    for got, want in zip(kernels.attention(q, k, v, window=np.int64(2)), kernels.attention(q, k, v, window=2)):
        np.testing.assert_array_equal(got, want)


def poisoned(x, rows):
    """A copy of x (B, heads, Tk, hd) with key rows [0, rows) set to NaN and inf."""
    x = x.copy()
    x[:, :, :rows:2] = np.nan
    x[:, :, 1:rows:2] = np.inf
    return x


@pytest.mark.parametrize("hd", [16, 65])
@pytest.mark.parametrize("route", KERNEL_ROUTES)
def test_keys_outside_every_window_of_a_long_cache_are_never_read(route, hd):
    """T queries at the end of a Tk-key cache see keys Tk - T - W + 1 and after: NaN and inf in the
    keys and values before those leave every result finite and exactly as without them (a kernel
    that multiplied them, even by 0, would give NaN). The twins drop those keys before any product."""
    if route != "attention_numpy" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built")
    T, Tk, window = 40, 300, 50
    unseen = Tk - T - window + 1  # 211 keys, more than three key tiles
    rng = np.random.default_rng(5)
    q, k, v, bias, dy = random_case(rng, np.float64, 2, 4, 2, T, Tk, hd, with_bias=True)
    bad_k, bad_v, bad_bias = poisoned(k, unseen), poisoned(v, unseen), bias.copy()
    bad_bias[:, :, :unseen] = np.nan
    attention = getattr(kernels, route)
    clean, dirty = attention(q, k, v, bias, window=window), attention(q, bad_k, bad_v, bad_bias, window=window)
    for got, want in zip(dirty, clean):
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, want)
    if route == "attention_naive_c":
        return  # the reference has no backward pass
    backward = kernels.attention_backward_c if route == "attention_c" else kernels.attention_backward_numpy
    y, lse = clean
    clean_grads = backward(q, k, v, bias, y, lse, dy, window=window)
    dirty_grads = backward(q, bad_k, bad_v, bad_bias, y, lse, dy, window=window)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), dirty_grads, clean_grads):
        assert np.isfinite(got).all(), name
        np.testing.assert_array_equal(got, want, err_msg=name)
    for name, gradient in zip(("dk", "dv", "dbias"), dirty_grads[1:]):
        assert not gradient[:, :, :unseen].any(), name  # (B, Hkv, Tk, hd) and (H, T, Tk): keys on axis 2


@needs_c
@pytest.mark.parametrize("hd", [16, 65])
def test_queries_far_past_poisoned_keys_never_read_them_in_the_c_core(hd):
    """A whole sequence (Tk = T): keys 0..5 hold NaN and inf. Queries whose windows end before them
    see none of them, and the C core, which skips the key blocks outside a tile's windows, leaves
    their results finite and exact; only a margin of rows next to the poisoned ones share a tile
    (of at most 64 queries or keys) with a query or key that reads it. Without the window every
    query sees key 0, and every result is NaN.

    C only: the NumPy twin forms whole (T, Tk) products, where a masked weight 0 times a NaN value
    is still NaN; it is checked on keys that no query sees, which it drops, in the test above."""
    T, window, bad = 300, 8, 6
    clear = bad + window + 2 * 64  # rows and keys from here on share no tile with a poisoned one
    rng = np.random.default_rng(6)
    q, k, v, bias, dy = random_case(rng, np.float64, 1, 2, 1, T, T, hd)
    bad_k, bad_v = poisoned(k, bad), poisoned(v, bad)
    y, lse = kernels.attention_c(q, k, v, window=window)
    y_bad, lse_bad = kernels.attention_c(q, bad_k, bad_v, window=window)
    np.testing.assert_array_equal(y_bad[:, :, clear:], y[:, :, clear:])
    np.testing.assert_array_equal(lse_bad[:, :, clear:], lse[:, :, clear:])
    grads = kernels.attention_backward_c(q, k, v, None, y, lse, dy, window=window)
    grads_bad = kernels.attention_backward_c(q, bad_k, bad_v, None, y_bad, lse_bad, dy, window=window)
    for name, got, want in zip(("dq", "dk", "dv"), grads_bad, grads):
        np.testing.assert_array_equal(got[:, :, clear:], want[:, :, clear:], err_msg=name)
    y_full, _ = kernels.attention_c(q, bad_k, bad_v)
    assert np.isnan(y_full).all()  # the check can fail: full attention reads the poisoned keys


@needs_c
@pytest.mark.parametrize("window", [1, 7, 64, 100])
def test_windowed_attention_c_gives_the_same_bits_on_any_thread_count(window):
    rng = np.random.default_rng(7)
    q, k, v, bias, dy = random_case(rng, np.float32, 2, 4, 2, 150, 170, 32, with_bias=True)
    before = kernels.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            kernels.set_num_threads(n)
            y, lse = kernels.attention_c(q, k, v, bias, window=window)
            results.append([y, lse, *kernels.attention_backward_c(q, k, v, bias, y, lse, dy, window=window)])
    finally:
        kernels.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
