"""minqkv.kernels.fused_attention: the fused causal attention, C against its NumPy twin and against
the C core's row-by-row reference, and its errors.

The NumPy twin (attention_numpy) stores the score matrices; attention.attend runs this op, and
tests/test_attention.py checks it against the step-by-step scores_and_weights + weighted_values;
the op's float64 gradient is checked in minqkv/lab/op_checks.py ('causal_attention').
"""

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minqkv import kernels
from minqkv.lab.bench_step import torch_available
from minqkv.kernels import fused_attention, runtime

needs_c = pytest.mark.skipif(not kernels.HAVE_C,
                             reason="the C extension minqkv._ccore is not built (pip install -e .)")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOLERANCE = {np.dtype(np.float32): dict(rtol=1e-4, atol=2e-5), np.dtype(np.float64): dict(rtol=1e-11, atol=1e-12)}


def heads_of(x, start, n, hd):
    """Columns [start, start + n * hd) of x (B, T, width) seen as n heads (B, n, T, hd): the view of
    a projection that a layer hands to attention, rows `width` elements apart."""
    B, T, _ = x.shape
    return x[:, :, start:start + n * hd].reshape(B, T, n, hd).transpose(0, 2, 1, 3)


@st.composite
def attention_cases(draw):
    """q, k, v, bias (or None), dy: any batch, heads grouped or not, Tk >= T (a KV cache), head widths
    that do and do not fill a vector register or a backward tile (64; wider heads take the pair-by-pair
    backward), and sequences longer than one query block (32) and one key block (64).

    Either contiguous (B, heads, T, hd) arrays or, as in the model, views of projections: q, k, v
    split from one (B, T, width) product (or q from one and k, v from another when Tk > T), with
    spare columns so that rows are further apart than the heads need, and dy a view of (B, T, H * hd)."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    B = draw(st.integers(0, 3))
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.integers(1, 3))
    T = draw(st.one_of(st.integers(0, 9), st.integers(60, 140), st.just(300)))
    Tk = T + draw(st.sampled_from([0, 0, 1, 5, 70]))
    hd = draw(st.sampled_from([1, 3, 8, 32, 64, 65]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.5, 1.0, 3.0]))  # large scores test the online rescaling
    bias = rng.standard_normal((H, T, Tk)).astype(dtype) if draw(st.booleans()) else None
    if not draw(st.booleans()):
        q = (rng.standard_normal((B, H, T, hd)) * scale).astype(dtype)
        k, v = (rng.standard_normal((B, Hkv, Tk, hd)).astype(dtype) for _ in range(2))
        return q, k, v, bias, rng.standard_normal(q.shape).astype(dtype)
    spare = draw(st.integers(0, 3))
    q_width, kv_width = H * hd, 2 * Hkv * hd
    if Tk == T:  # one product, split three ways
        product = rng.standard_normal((B, T, q_width + kv_width + spare)).astype(dtype)
        queries, keys, first_key = product, product, q_width
    else:  # the new tokens' queries; keys and values of every token, from the cache
        queries = rng.standard_normal((B, T, q_width + spare)).astype(dtype)
        keys, first_key = rng.standard_normal((B, Tk, kv_width + spare)).astype(dtype), 0
    queries[:, :, :q_width] *= scale
    q = heads_of(queries, 0, H, hd)
    k, v = heads_of(keys, first_key, Hkv, hd), heads_of(keys, first_key + Hkv * hd, Hkv, hd)
    dy = heads_of(rng.standard_normal((B, T, q_width)).astype(dtype), 0, H, hd)
    return q, k, v, bias, dy


@needs_c
@FAST
@given(attention_cases())
def test_attention_c_matches_numpy_twin(case):
    q, k, v, bias, dy = case
    tolerance = TOLERANCE[q.dtype]
    y, lse = kernels.attention_c(q, k, v, bias)
    y_twin, lse_twin = kernels.attention_numpy(q, k, v, bias)
    np.testing.assert_allclose(y, y_twin, **tolerance)
    np.testing.assert_allclose(lse, lse_twin, **tolerance)
    grads = kernels.attention_backward_c(q, k, v, bias, y_twin, lse_twin, dy)
    twins = kernels.attention_backward_numpy(q, k, v, bias, y_twin, lse_twin, dy)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, twins):
        if want is None:
            assert got is None
        else:
            size = np.abs(want).max(initial=1)  # sums over keys and queries: compare to their size
            np.testing.assert_allclose(got, want, rtol=tolerance["rtol"], atol=tolerance["atol"] * size,
                                       err_msg=name)


@needs_c
@FAST
@given(attention_cases())
def test_attention_c_matches_the_row_by_row_reference(case):
    q, k, v, bias, _ = case
    tolerance = TOLERANCE[q.dtype]
    y, lse = kernels.attention_c(q, k, v, bias)
    y_naive, lse_naive = kernels.attention_naive_c(q, k, v, bias)
    assert y_naive.flags.c_contiguous and y_naive.shape == y.shape and lse_naive.shape == lse.shape
    np.testing.assert_allclose(y, y_naive, **tolerance)
    np.testing.assert_allclose(lse, lse_naive, **tolerance)


@needs_c
def test_the_row_by_row_reference_averages_the_visible_values_of_equal_keys():
    T = 5
    v = np.arange(2 * T, dtype=np.float64).reshape(1, 1, T, 2)
    y, lse = kernels.attention_naive_c(np.zeros((1, 1, T, 2)), np.zeros((1, 1, T, 2)), v)
    np.testing.assert_allclose(y[0, 0], [v[0, 0, :i + 1].mean(axis=0) for i in range(T)])
    np.testing.assert_allclose(lse[0, 0], np.log(np.arange(1, T + 1)))  # every score is 0


def test_attention_c_matches_its_result_on_contiguous_copies_for_views_with_any_strides():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 40, 3, 2, 8))
    q = x[:, ::-1, 0].transpose(0, 2, 1, 3)  # time reversed: negative strides, which the C core copies
    k = np.asfortranarray(x[:, :, 1].transpose(0, 2, 1, 3))  # the head dimension not contiguous
    v = x[:, :, 2, :, ::2].transpose(0, 2, 1, 3)[..., :4]  # every other column
    q, k = q[..., :4], k[..., :4]
    dy = rng.standard_normal(q.shape)
    copies = [np.ascontiguousarray(a) for a in (q, k, v, dy)]
    y, lse = kernels.attention_c(q, k, v)
    y_copy, lse_copy = kernels.attention_c(*copies[:3])
    np.testing.assert_array_equal(y, y_copy)
    np.testing.assert_array_equal(lse, lse_copy)
    grads = kernels.attention_backward_c(q, k, v, None, y, lse, dy)
    grads_copy = kernels.attention_backward_c(*copies[:3], None, y_copy, lse_copy, copies[3])
    for got, want in zip(grads[:3], grads_copy[:3]):
        np.testing.assert_array_equal(got, want)


def test_attention_outputs_are_stored_token_by_token(backend):
    """y, dq, dk and dv (B, heads, T, hd) lie in memory as (B, T, heads, hd): merging their heads
    into (B, T, heads * hd), which the layer does next, is a view."""
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 4, 5, 3))
    k, v = rng.standard_normal((2, 2, 7, 3)), rng.standard_normal((2, 2, 7, 3))
    y, lse = kernels.attention(q, k, v)
    outputs = [y, *kernels.attention_backward(q, k, v, None, y, lse, np.ones_like(q))[:3]]
    for name, out in zip(("y", "dq", "dk", "dv"), outputs):
        assert out.transpose(0, 2, 1, 3).flags.c_contiguous, name


def new_bytes_during(fn):
    """The peak of memory allocated (and traced) while fn runs: NumPy reports its arrays to tracemalloc."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@needs_c
def test_attention_c_reads_the_heads_of_a_projection_without_copying_them():
    B, T, H, hd = 2, 128, 4, 32
    product = np.random.default_rng(5).standard_normal((B, T, 3 * H * hd))  # x [W_q | W_k | W_v]
    q, k, v = (heads_of(product, i * H * hd, H, hd) for i in range(3))
    one_head_array = q.nbytes  # 256 KiB; a copy of q, k or v would add that much
    outputs = q.nbytes + q.nbytes // hd  # y and lse
    assert new_bytes_during(lambda: kernels.attention_c(q, k, v)) < outputs + one_head_array // 2
    y, lse = kernels.attention_c(q, k, v)
    dy = heads_of(np.ones((B, T, H * hd)), 0, H, hd)
    gradients = 3 * q.nbytes  # dq, dk, dv
    assert new_bytes_during(lambda: kernels.attention_backward_c(q, k, v, None, y, lse, dy)) \
        < gradients + one_head_array // 2


@needs_c
def test_attention_c_copies_what_it_streams_head_by_head_from_long_queries_on(monkeypatch):
    B, T, H, hd = 2, 128, 4, 32
    rng = np.random.default_rng(6)
    product = rng.standard_normal((B, T, 3 * H * hd))
    q, k, v = (heads_of(product, i * H * hd, H, hd) for i in range(3))
    dy = heads_of(rng.standard_normal((B, T, H * hd)), 0, H, hd)
    y, lse = kernels.attention_c(q, k, v)
    grads = kernels.attention_backward_c(q, k, v, None, y, lse, dy)
    monkeypatch.setattr(fused_attention, "LONG_QUERIES", T)  # as if these 128 queries were long
    one_head_array, outputs, gradients = q.nbytes, q.nbytes + q.nbytes // hd, 3 * q.nbytes
    assert new_bytes_during(lambda: kernels.attention_c(q, k, v)) >= outputs + 2 * one_head_array  # k, v
    y_long, lse_long = kernels.attention_c(q, k, v)
    np.testing.assert_array_equal(y_long, y)  # the same sums, read from other memory
    np.testing.assert_array_equal(lse_long, lse)
    backward = lambda: kernels.attention_backward_c(q, k, v, None, y, lse, dy)  # noqa: E731
    assert new_bytes_during(backward) >= gradients + 3 * one_head_array  # q, y, dy
    for got, want in zip(backward()[:3], grads[:3]):
        np.testing.assert_array_equal(got, want)
    # decoding: one query reads its long cache once, where it lies
    one_query = q[:, :, -1:]
    assert new_bytes_during(lambda: kernels.attention_c(one_query, k, v)) < one_head_array // 2


@needs_c
def test_the_c_core_refuses_output_rows_that_overlap():
    """The C core's own check: a y layout whose rows overlap would have threads write each other's
    rows; minqkv.kernels never passes one, but C says no rather than race."""
    lib, P = runtime.lib, runtime.pointer
    B, H, T, hd = 1, 2, 4, 8
    q, y, lse = np.zeros((B, H, T, hd)), np.zeros((B, H, T, hd)), np.zeros((B, H, T))
    contiguous = (H * T * hd, T * hd, hd)
    for y_layout, status in ((contiguous, lib.MINQKV_OK), ((H * T * hd, T * hd, hd - 1), lib.MINQKV_BAD_ARGUMENT),
                             ((H * T * hd, hd, hd), lib.MINQKV_BAD_ARGUMENT), ((0, T * hd, hd), lib.MINQKV_OK)):
        assert lib.minqkv_attention_f64(P(q), contiguous, P(q), contiguous, P(q), contiguous, P(None),
                                        P(y), y_layout, P(lse), B, H, H, T, T, hd, 0, 0.5, 1) == status, y_layout


def test_attention_of_one_key_returns_its_value(backend):
    q = np.ones((1, 1, 1, 4))
    v = np.arange(4.0).reshape(1, 1, 1, 4)
    y, lse = kernels.attention(q, np.ones((1, 1, 1, 4)), v)
    np.testing.assert_allclose(y, v)
    np.testing.assert_allclose(lse, [[[2.0]]])  # the one score: q.k / sqrt(4) = 2


def test_attention_of_equal_keys_averages_the_visible_values(backend):
    T = 5
    v = np.arange(T, dtype=np.float64).reshape(1, 1, T, 1)
    y, _ = kernels.attention(np.zeros((1, 1, T, 1)), np.zeros((1, 1, T, 1)), v)
    np.testing.assert_allclose(y[0, 0, :, 0], [np.mean(np.arange(i + 1)) for i in range(T)])


def test_attention_key_heads_must_divide_query_heads(backend):
    with pytest.raises(ValueError, match="q has 3 heads but k and v have 2"):
        kernels.attention(np.zeros((1, 3, 2, 4)), np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)))


def test_attention_bias_of_the_wrong_shape_is_named(backend):
    with pytest.raises(ValueError, match=r"bias has shape \(1, 2, 2\) but must be \(H, T, Tk\) = \(2, 2, 2\)"):
        kernels.attention(np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)),
                          np.zeros((1, 2, 2)))


def test_attention_needs_at_least_as_many_keys_as_queries(backend):
    with pytest.raises(ValueError, match="causal attention needs Tk >= T"):
        kernels.attention(np.zeros((1, 1, 3, 4)), np.zeros((1, 1, 2, 4)), np.zeros((1, 1, 2, 4)))


@needs_c
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_c_gives_the_same_bits_on_any_thread_count(with_bias):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 4, 150, 32)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((4, 150, 150)).astype(np.float32) if with_bias else None
    before = kernels.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            kernels.set_num_threads(n)
            y, lse = kernels.attention_c(q, k, v, bias)
            results.append([y, lse, *(g for g in kernels.attention_backward_c(q, k, v, bias, y, lse, q)
                                      if g is not None)])
    finally:
        kernels.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


LONG_COLUMNS = {"minqkv_ms", "minqkv_tokens_per_s", "minqkv_peak_mb", "minqkv_step_mb"}
TORCH_COLUMNS = {"torch_ms", "torch_tokens_per_s", "torch_peak_mb", "torch_step_mb", "ratio"}
STUDY_COLUMNS = {"model", "codes", "T", "threads", "kv_cache_mb", "decode_ms_per_token", "decode_tokens_per_s"}


def test_long_bench_times_attention_steps_and_the_study_and_says_when_torch_is_absent():
    from minqkv.lab.bench_step import STUDY_MODELS, format_long_table, run_long_bench

    result = run_long_bench(lengths=(65, 130), rounds=1, with_torch=False)
    assert [row["T"] for row in result["attention"]] == [row["T"] for row in result["step"]] == [65, 130]
    for row in result["attention"] + result["step"]:
        assert LONG_COLUMNS <= set(row) and not TORCH_COLUMNS & set(row)
    assert [row["model"] for row in result["study"]] == list(STUDY_MODELS)
    for row in result["study"]:
        assert (STUDY_COLUMNS | LONG_COLUMNS) <= set(row) and row["T"] == 130
    assert {row["model"]: row["codes"] for row in result["study"]}["pruned"] == "a-b/--a/--a/--a"
    cache = {row["model"]: row["kv_cache_mb"] for row in result["study"]}
    assert cache["abb"] == pytest.approx(cache["abc"] / 2, rel=0.05)  # K = V is cached once
    assert set(result["step_memory"]) == {"minqkv"}
    table = format_long_table(result)
    assert "PyTorch is not installed" in table and "decode tok/s" in table and "step memory" in table


@pytest.mark.skipif(not torch_available(), reason="PyTorch is not installed")
def test_long_bench_puts_pytorch_beside_minqkv_when_it_is_installed():
    from minqkv.lab.bench_step import format_long_table, run_long_bench

    result = run_long_bench(lengths=(65,), rounds=1, with_torch=True, kinds=())
    for row in result["attention"] + result["step"]:
        assert (LONG_COLUMNS | TORCH_COLUMNS) <= set(row)
    assert set(result["step_memory"]) == {"minqkv", "torch"}
    assert "torch ms" in format_long_table(result)


@pytest.mark.parametrize("lengths", [(), (64,), (128, 0)])
def test_long_bench_refuses_lengths_that_leave_no_room_to_decode(lengths):
    from minqkv.lab.bench_step import run_long_bench

    with pytest.raises(ValueError, match="lengths must be above STUDY_DECODE_TOKENS"):
        run_long_bench(lengths=lengths, with_torch=False)
