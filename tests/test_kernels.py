"""minqkv.kernels: the registry and the backend switch, matmul and softmax (the C core against its
NumPy twins, the softmax contract, the errors), threads and the memory settings.

Tests marked `needs_c` compare the C kernels with the NumPy twins, calling both by name
(matmul_c against matmul_numpy), and are skipped when the extension is not built. The behaviour
tests run on every available backend (conftest's `backend` fixture) and check values worked out
independently of the code, so the file also passes with MINQKV_BACKEND=numpy and without a
compiler. The threads test is in test_kernels_threads.py.
"""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minqkv
from minqkv import kernels
from minqkv.kernels import runtime

needs_c = pytest.mark.skipif(not kernels.HAVE_C,
                             reason="the C extension minqkv._ccore is not built (pip install -e .)")
DTYPES = [np.float32, np.float64]
# NaN and inf inputs are part of the property tests: NumPy's warnings about them are expected
SPECIAL_VALUES_WARN = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def threads():
    """Let a test change the thread count; restore it afterwards."""
    before = kernels.get_num_threads()
    yield kernels.set_num_threads
    kernels.set_num_threads(before)


# ---- making arrays in awkward layouts -----------------------------------------------------


def misaligned(x):
    """A copy of x whose data starts one byte past an aligned address."""
    buffer = bytearray(x.nbytes + 1)
    out = np.frombuffer(buffer, dtype=x.dtype, count=x.size, offset=1).reshape(x.shape)
    out[...] = x
    assert x.size == 0 or not out.flags.aligned
    return out


def in_layout(x, layout):
    """x's values, stored as `layout` says."""
    if layout == "contiguous":
        return x
    if layout == "transposed":  # each matrix stored column by column, like w.T
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(x, -1, -2)), -1, -2)
    if layout == "strided":  # every other column of a wider array
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "misaligned":
        return misaligned(x)
    if layout == "reversed":  # rows walked backwards: a negative stride
        return np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    if layout == "readonly":
        x = x.copy()
        x.setflags(write=False)
        return x
    raise AssertionError(layout)


def with_specials(x, special, rng):
    """x with a few entries set to `special` (None, nan, inf or -inf) at random places."""
    if special is None or x.size == 0:
        return x
    x = x.copy()
    x.flat[rng.integers(0, x.size, size=max(1, x.size // 50))] = special
    return x


def gemm_error_bound(a, b, K):
    """Each entry of a float GEMM is within 2 K eps (|op(a)| @ |op(b)|) of the exact product,
    for any summation order; two implementations are within twice that of each other.
    (Entries that NaN or inf reach are not finite and are compared apart; they count as 0 here.)"""
    eps = np.finfo(a.dtype).eps
    magnitude_a = np.nan_to_num(np.abs(a).astype(np.float64), nan=0, posinf=0)
    magnitude_b = np.nan_to_num(np.abs(b).astype(np.float64), nan=0, posinf=0)
    return 4 * max(K, 1) * eps * (magnitude_a @ magnitude_b) + 1e-30


def assert_same_product(got, want, op_a, op_b):
    """got and want agree: NaN and infinities in the same places, the rest within the bound."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.where(np.isinf(want), want, 0), np.where(np.isinf(got), got, 0))
    finite = np.isfinite(want)
    bound = gemm_error_bound(op_a, op_b, op_a.shape[-1])
    assert np.all(np.abs(got.astype(np.float64) - want)[finite] <= bound[finite])


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(minqkv.__file__)))


def _run_python(code, **environment):
    """Run code in a fresh interpreter that imports this minqkv; return the finished process."""
    env = dict(os.environ, **environment)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)


# ---- matmul -------------------------------------------------------------------------------

dims = st.one_of(st.integers(0, 9), st.integers(10, 140), st.sampled_from([255, 257, 300]))


@st.composite
def matmul_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([None, 0, 1, 2, 3]))
    M, N, K = draw(dims), draw(dims), draw(dims)
    if M * N * K > 300_000:  # keep each example quick
        K = max(1, 300_000 // max(M * N, 1))
    trans_a, trans_b = draw(st.booleans()), draw(st.booleans())
    layouts = ["contiguous", "transposed", "strided", "misaligned", "readonly", "reversed"]
    if batch is not None and batch > 1:
        layouts.append("broadcast")  # one matrix for the whole batch: batch stride 0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lead = () if batch is None else (batch,)

    def operand(shape):
        layout = draw(st.sampled_from(layouts))
        special = draw(st.sampled_from([None] * 4 + [np.nan, np.inf, -np.inf]))
        if layout == "broadcast":
            matrix = with_specials(rng.standard_normal(shape).astype(dtype), special, rng)
            return np.broadcast_to(in_layout(matrix, draw(st.sampled_from(layouts[:2]))), lead + shape)
        return in_layout(with_specials(rng.standard_normal(lead + shape).astype(dtype), special, rng), layout)

    a = operand((K, M) if trans_a else (M, K))
    b = operand((N, K) if trans_b else (K, N))
    return a, b, trans_a, trans_b


@SPECIAL_VALUES_WARN
@needs_c
@pytest.mark.parametrize("matmul_c", [kernels.matmul_c, kernels.matmul_naive_c], ids=["blocked", "naive"])
@THOROUGH
@given(case=matmul_cases())
def test_matmul_c_matches_numpy_twin(matmul_c, case):
    a, b, trans_a, trans_b = case
    got = matmul_c(a, b, trans_a, trans_b)
    want = kernels.matmul_numpy(a, b, trans_a, trans_b)
    assert got.shape == want.shape and got.dtype == a.dtype
    assert got.flags.c_contiguous
    op_a = np.swapaxes(a, -1, -2) if trans_a else a
    op_b = np.swapaxes(b, -1, -2) if trans_b else b
    assert_same_product(got, want, op_a, op_b)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_naive_and_blocked_gemm_compute_the_same_product(dtype, trans_a, trans_b):
    rng = np.random.default_rng(9)
    a = rng.standard_normal((2, 300, 130) if trans_a else (2, 130, 300)).astype(dtype)  # K = 300 > KC
    b = rng.standard_normal((2, 70, 300) if trans_b else (2, 300, 70)).astype(dtype)
    naive = kernels.matmul_naive_c(a, b, trans_a, trans_b)
    blocked = kernels.matmul_c(a, b, trans_a, trans_b)
    op_a = np.swapaxes(a, -1, -2) if trans_a else a
    op_b = np.swapaxes(b, -1, -2) if trans_b else b
    assert naive.shape == blocked.shape == (2, 130, 70)
    bound = gemm_error_bound(op_a, op_b, 300)
    assert np.all(np.abs(naive.astype(np.float64) - blocked) <= bound)
    assert np.all(np.abs(naive.astype(np.float64) - op_a.astype(np.float64) @ op_b) <= bound)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, M, K, N", [
    (None, 263, 400, 330),  # big enough to be shared by threads: split into bands of rows
    (None, 2000, 64, 48),  # tall: more bands than threads, taken as threads free up
    (None, 70, 420, 1200),  # wide: bands of columns
    (3, 263, 400, 330),  # a batch that threads cannot share evenly
    (4, 100, 300, 600),
])
def test_matmul_c_gives_the_same_bits_on_any_thread_count(dtype, batch, M, K, N, threads):
    rng = np.random.default_rng(1)
    lead = () if batch is None else (batch,)
    a = rng.standard_normal(lead + (M, K)).astype(dtype)
    b = rng.standard_normal(lead + (K, N)).astype(dtype)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(kernels.matmul_c(a, b))
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert np.all(np.abs(results[0] - a @ b) <= gemm_error_bound(a, b, K))


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, N, trans_a", [
    (96, 1000, 64, True),  # a weight gradient X^T dY: 8 slices of K (4 in float64), shared with 2 threads and up
    (40, 3000, 150, True),  # 24 slices (12 in float64), the last one short
    (150, 700, 40, False),  # op(A) read as it lies, bands of rows beside the slices
])
def test_matmul_c_split_along_k_gives_the_bits_of_one_thread(dtype, M, K, N, trans_a, threads):
    """A small product with a long K is cut along K between threads, each slice summed apart and
    the slices then added in order: the same bits as one thread, with a bias and with add_to."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    bias, base = rng.standard_normal(N).astype(dtype), rng.standard_normal((M, N)).astype(dtype)
    workspace = runtime.c_function("gemm_workspace", np.dtype(dtype))
    assert workspace(1, M, N, K, 3) >= 2 * M * N  # the slices' sums are there: K really is split
    results = []
    for n in (1, 2, 3, 8):
        threads(n)
        results.append((kernels.matmul_c(a, b, trans_a=trans_a, bias=bias),
                        kernels.matmul_c(a, b, trans_a=trans_a, add_to=base.copy())))
    for with_bias, added in results[1:]:
        assert np.array_equal(with_bias, results[0][0]) and np.array_equal(added, results[0][1])
    op_a = a.T if trans_a else a
    product, eps = op_a.astype(np.float64) @ b, np.finfo(dtype).eps
    for got, addend in zip(results[0], (bias, base)):  # plus one rounding for the addition
        want = product + addend
        assert np.all(np.abs(got - want) <= gemm_error_bound(op_a, b, K) + 2 * eps * np.abs(want))


@needs_c
def test_matmul_c_splits_k_only_while_the_slices_sums_stay_small():
    """The slices' sums live in the workspace: a product whose (slices - 1) x M x N would pass
    K_SPLIT_MAX_PARTIALS (2^22 elements) keeps its bands instead."""
    workspace = runtime.c_function("gemm_workspace", np.dtype(np.float32))
    assert workspace(1, 128, 384, 4096, 16) >= 15 * 128 * 384  # the model's weight gradient: split
    assert workspace(1, 600, 600, 20 * 256, 16) < 19 * 600 * 600  # 39 x 360,000 sums (KC = 128): not split


@needs_c
def test_c_gemm_refuses_a_workspace_sized_for_fewer_threads():
    lib, pointer = runtime.lib, runtime.pointer
    a = np.ones((330, 330), np.float32)  # big enough to be shared by threads
    out = np.zeros_like(a)
    size_for_one = lib.minqkv_gemm_workspace_f32(1, 330, 330, 330, 1)
    if size_for_one == lib.minqkv_gemm_workspace_f32(1, 330, 330, 330, 2):
        pytest.skip("the C core is built without OpenMP (MINQKV_OPENMP=0): one thread, one slice")
    assert size_for_one < lib.minqkv_gemm_workspace_f32(1, 330, 330, 330, 2)  # a slice per thread
    workspace = np.empty(size_for_one, np.float32)
    arguments = (0, 0, 1, 330, 330, 330, pointer(a), 330, 0, pointer(a), 330, 0, pointer(out), 330, 0,
                 runtime.ffi.NULL, 0, pointer(workspace), workspace.size)
    assert lib.minqkv_gemm_f32(*arguments, 2) == lib.MINQKV_BAD_ARGUMENT
    assert np.all(out == 0)  # refused before touching memory
    assert lib.minqkv_gemm_f32(*arguments, 1) == lib.MINQKV_OK
    np.testing.assert_array_equal(out, 330)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 12, 125])  # every row count of a tile (MR = 6), past MC = 120
def test_matmul_c_reads_a_in_place_in_tiles_of_every_row_count(dtype, trans_a, trans_b, M):
    rng = np.random.default_rng(M)
    for N in (1, 7, 15, 16, 17, 31, 32, 33, 63, 65):  # around NR (32 for float32, 16 for float64) and 2 NR
        for K in (1, 32, 257):  # one product, the attention's head size, past KC (128 or 256)
            a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
            b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
            op_a, op_b = (a.T if trans_a else a), (b.T if trans_b else b)
            got = kernels.matmul_c(a, b, trans_a, trans_b)
            assert np.all(np.abs(got - op_a.astype(np.float64) @ op_b) <= gemm_error_bound(op_a, op_b, K))


@pytest.mark.parametrize("matmul", ["numpy", "c", "naive"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, True)])
def test_matmul_adds_a_bias_to_every_row_and_adds_into_add_to(matmul, dtype, trans_a, trans_b, threads):
    if matmul != "numpy" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built (pip install -e .)")
    matmul = {"numpy": kernels.matmul_numpy, "c": kernels.matmul_c, "naive": kernels.matmul_naive_c}[matmul]
    rng = np.random.default_rng(6)
    # N around NR (a narrow last tile reads only its columns of the bias), K = 0 (C = bias) and past KC
    for batch, M, N, K in [(None, 7, 33, 5), (None, 13, 65, 0), (None, 125, 40, 300), (3, 20, 17, 32)]:
        lead = () if batch is None else (batch,)
        a = rng.standard_normal(lead + ((K, M) if trans_a else (M, K))).astype(dtype)
        b = rng.standard_normal(lead + ((N, K) if trans_b else (K, N))).astype(dtype)
        bias, before = rng.standard_normal(N).astype(dtype), rng.standard_normal(lead + (M, N)).astype(dtype)
        op_a = np.swapaxes(a, -1, -2) if trans_a else a
        op_b = np.swapaxes(b, -1, -2) if trans_b else b
        product = op_a.astype(np.float64) @ op_b
        bound = gemm_error_bound(op_a, op_b, K) + 4 * np.finfo(dtype).eps * (np.abs(bias) + np.abs(before))
        for n in (1, 2):
            threads(n)
            assert np.all(np.abs(matmul(a, b, trans_a, trans_b, bias=bias) - (product + bias)) <= bound)
            into = before.copy()
            assert matmul(a, b, trans_a, trans_b, add_to=into) is into  # in place, and handed back
            assert np.all(np.abs(into - (before + product)) <= bound)
            into = before.copy()
            matmul(a, b, trans_a, trans_b, bias=bias, add_to=into)
            assert np.all(np.abs(into - (before + product + bias)) <= bound)


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_matmul_names_a_bias_or_add_to_that_does_not_fit(backend):
    if backend == "c" and not kernels.HAVE_C:
        pytest.skip("the C extension minqkv._ccore is not built (pip install -e .)")
    matmul = kernels.KERNELS[backend]["matmul"]
    a, b = np.ones((4, 3)), np.ones((3, 5))
    with pytest.raises(ValueError, match=r"matmul: bias has shape \(4,\), expected \(5,\)"):
        matmul(a, b, bias=np.ones(4))
    with pytest.raises(TypeError, match="matmul: a is float64 but bias is float32"):
        matmul(a, b, bias=np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r"matmul: add_to has shape \(5, 4\), expected the product's \(4, 5\)"):
        matmul(a, b, add_to=np.ones((5, 4)))
    with pytest.raises(ValueError, match="matmul: add_to must be a writable C-contiguous array"):
        matmul(a, b, add_to=np.ones((5, 4)).T)
    with pytest.raises(ValueError, match="matmul: add_to shares memory with a or b"):
        square = np.ones((3, 3))
        matmul(square, square, add_to=square)
    read_only = np.ones((4, 5))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="matmul: add_to must be a writable"):
        matmul(a, b, add_to=read_only)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
def test_matmul_c_with_one_a_for_the_whole_batch(dtype, trans_a, threads):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((32, 65) if trans_a else (65, 32)).astype(dtype)  # 65 rows: a tile of 5
    b = rng.standard_normal((5, 32, 40)).astype(dtype)
    op_a = a.T if trans_a else a
    want = op_a.astype(np.float64) @ b
    for n in (1, 2):
        threads(n)
        got = kernels.matmul_c(np.broadcast_to(a, (5,) + a.shape), b, trans_a)  # batch stride 0
        assert np.all(np.abs(got - want) <= gemm_error_bound(np.broadcast_to(op_a, (5, 65, 32)), b, 32))


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
def test_c_gemm_reads_a_in_place_with_a_row_stride_longer_than_a_row(dtype, trans_a):
    lib, pointer = runtime.lib, runtime.pointer
    M, K, N, lda = 13, 20, 17, 29  # 13 rows: two whole tiles of 6 rows and one of 1
    rng = np.random.default_rng(4)
    rows, cols = (K, M) if trans_a else (M, K)
    # exactly as long as the last row needs: a read past it is caught by the sanitizer build
    a_memory = rng.standard_normal((rows - 1) * lda + cols).astype(dtype)
    a = np.lib.stride_tricks.as_strided(a_memory, (rows, cols), (lda * a_memory.itemsize, a_memory.itemsize))
    b = rng.standard_normal((K, N)).astype(dtype)
    out = np.zeros((M, N), dtype)
    gemm, workspace_size = ((lib.minqkv_gemm_f32, lib.minqkv_gemm_workspace_f32) if dtype == np.float32
                            else (lib.minqkv_gemm_f64, lib.minqkv_gemm_workspace_f64))
    workspace = np.empty(workspace_size(1, M, N, K, 2), dtype)
    status = gemm(int(trans_a), 0, 1, M, N, K, pointer(a_memory), lda, 0, pointer(b), N, 0,
                  pointer(out), N, 0, runtime.ffi.NULL, 0, pointer(workspace), workspace.size, 2)
    assert status == lib.MINQKV_OK
    op_a = a.T if trans_a else a
    assert np.all(np.abs(out - op_a.astype(np.float64) @ b) <= gemm_error_bound(op_a, b, K))


@needs_c
@pytest.mark.parametrize("batch, M, N, K", [
    (1, 64, 64, 127),  # just under 2^20 flops: one thread
    (1, 64, 64, 128),  # 2^20 flops: shared by threads
    (2, 64, 64, 64),  # 2^20 flops as two matrices: one each
    (3, 7, 40, 2048),  # an uneven batch of short matrices: each cut in two bands of columns
])
def test_matmul_c_gives_the_same_bits_around_the_parallel_threshold(batch, M, N, K, threads):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((batch, M, K)).astype(np.float32)
    b = rng.standard_normal((batch, K, N)).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(kernels.matmul_c(a, b))
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert np.all(np.abs(results[0] - a.astype(np.float64) @ b) <= gemm_error_bound(a, b, K))


@needs_c
def test_matmul_c_crosses_every_cache_block():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((130, 600)).astype(np.float32)  # > MC rows, > 2 KC slices
    b = rng.standard_normal((600, 2100)).astype(np.float32)  # > NC columns
    got = kernels.matmul_c(a, b)
    assert np.all(np.abs(got - a @ b) <= gemm_error_bound(a, b, 600))


def test_matmul_returns_a_new_c_contiguous_array(backend):
    a = np.ones((3, 4), np.float32)
    b = np.ones((5, 4), np.float32).T  # Fortran-ordered view
    out = kernels.matmul(a, b)
    assert out.flags.c_contiguous
    assert not np.shares_memory(out, a) and not np.shares_memory(out, b)
    np.testing.assert_array_equal(out, np.full((3, 5), 4, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape, b_shape, out_shape", [
    ((0, 4), (4, 5), (0, 5)),
    ((3, 0), (0, 5), (3, 5)),
    ((3, 4), (4, 0), (3, 0)),
    ((0, 3, 4), (0, 4, 5), (0, 3, 5)),
    ((2, 3, 0), (2, 0, 5), (2, 3, 5)),
])
def test_matmul_with_empty_dimensions(backend, dtype, a_shape, b_shape, out_shape):
    out = kernels.matmul(np.ones(a_shape, dtype), np.ones(b_shape, dtype))
    assert out.shape == out_shape and out.dtype == dtype
    assert np.all(out == 0)  # an empty sum is zero


def test_matmul_transposes_flags(backend):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 4, 3))
    b = rng.standard_normal((2, 5, 4))
    out = kernels.matmul(a, b, trans_a=True, trans_b=True)  # (2, 3, 4) @ (2, 4, 5)
    np.testing.assert_allclose(out, np.swapaxes(a, 1, 2) @ np.swapaxes(b, 1, 2), rtol=1e-12)


# ---- softmax ------------------------------------------------------------------------------


@st.composite
def softmax_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    causal = draw(st.booleans())
    ndim = draw(st.integers(2 if causal else 1, 4))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim - 1, max_size=ndim - 1)))
    shape += (draw(st.one_of(st.integers(0, 20), st.integers(100, 300))),)
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (scale * rng.standard_normal(shape)).astype(dtype)
    x = with_specials(x, draw(st.sampled_from([None] * 4 + [np.nan, np.inf, -np.inf])), rng)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "misaligned", "reversed", "readonly"]))
    if layout in ("transposed", "reversed") and ndim < 2:
        layout = "contiguous"
    return in_layout(x, layout), causal


TOLERANCE = {np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6), np.dtype(np.float64): dict(rtol=1e-12, atol=1e-14)}


@SPECIAL_VALUES_WARN
@needs_c
@FAST
@given(softmax_cases())
def test_softmax_c_matches_numpy_twin(case):
    x, causal = case
    got = kernels.softmax_c(x, causal)
    want = kernels.softmax_numpy(x, causal)
    assert got.shape == x.shape and got.dtype == x.dtype and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, **TOLERANCE[x.dtype])


@SPECIAL_VALUES_WARN
@needs_c
@FAST
@given(softmax_cases())
def test_softmax_backward_c_matches_numpy_twin(case):
    x, _ = case
    y = kernels.softmax_numpy(x)
    rng = np.random.default_rng(x.size)
    dy = with_specials(rng.standard_normal(x.shape).astype(x.dtype), rng.choice([None, np.nan, np.inf]), rng)
    got = kernels.softmax_backward_c(y, dy)
    np.testing.assert_allclose(got, kernels.softmax_backward_numpy(y, dy), **TOLERANCE[x.dtype])


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_c_gives_the_same_bits_on_any_thread_count(dtype, threads):
    x = np.random.default_rng(6).standard_normal((32, 130, 128)).astype(dtype)  # big enough to share
    dy = np.random.default_rng(7).standard_normal(x.shape).astype(dtype)
    results = []
    for n in (1, 2, 3):
        threads(n)
        y = kernels.softmax_c(x, causal=True)
        results.append((y, kernels.softmax_backward_c(y, dy)))
    for y, dx in results[1:]:
        assert np.array_equal(y, results[0][0]) and np.array_equal(dx, results[0][1])
    np.testing.assert_allclose(results[0][0], kernels.softmax_numpy(x, causal=True), **TOLERANCE[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_sum_to_one_even_for_huge_values(backend, dtype):
    x = np.array([[1e4, 1e4 - 1, -1e4], [3e38 if dtype == np.float32 else 1e300, 0.0, -1.0]], dtype)
    y = kernels.softmax(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0, :2], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_softmax_hides_future_keys_with_a_kv_cache(backend, dtype):
    Tq, Tk = 3, 7  # 3 new queries at the end of a 7-token context
    x = np.random.default_rng(4).standard_normal((2, Tq, Tk)).astype(dtype)
    y = kernels.softmax(x, causal=True)
    for i in range(Tq):
        visible = i + (Tk - Tq) + 1  # query i sees keys 0 .. i + Tk - Tq
        np.testing.assert_array_equal(y[:, i, visible:], 0)
        np.testing.assert_allclose(y[:, i, :visible], kernels.softmax_numpy(x[:, i, :visible]),
                                   **TOLERANCE[np.dtype(dtype)])
    np.testing.assert_allclose(y[:, -1], kernels.softmax(x[:, -1]), **TOLERANCE[np.dtype(dtype)])


def test_causal_softmax_rows_that_see_nothing_are_zero(backend):
    x = np.ones((4, 2))  # Tq > Tk: query i sees keys j <= i - 2
    y = kernels.softmax(x, causal=True)
    np.testing.assert_array_equal(y, [[0, 0], [0, 0], [1, 0], [0.5, 0.5]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_of_an_all_minus_inf_row_is_zero(backend, dtype):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0, -np.inf, 0]], dtype)
    y = kernels.softmax(x)
    np.testing.assert_array_equal(y, [[0, 0, 0], [0.5, 0, 0.5]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_propagates_nan_to_its_row_only(backend, dtype):
    x = np.array([[0, np.nan, 1], [0, 1, 2], [np.inf, 0, 1]], dtype)
    y = kernels.softmax(x)
    assert np.all(np.isnan(y[0])) and np.all(np.isnan(y[2]))  # as NumPy's formula gives
    np.testing.assert_allclose(y[1], [0.09003057317038046, 0.24472847105479764, 0.6652409557748219],
                               rtol=1e-6)  # e^j / (1 + e + e^2)


def test_softmax_nan_in_a_hidden_position_does_not_leak(backend):
    x = np.array([[0.0, np.nan], [1.0, 1.0]])
    y = kernels.softmax(x, causal=True)
    np.testing.assert_array_equal(y, [[1, 0], [0.5, 0.5]])


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4), (2, 0, 5)])
def test_softmax_of_empty_arrays(backend, shape):
    for causal in (False, True) if len(shape) >= 2 else (False,):
        y = kernels.softmax(np.ones(shape, np.float32), causal=causal)
        assert y.shape == shape and y.dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_backward_is_the_jacobian_transpose_product(backend, dtype):
    rng = np.random.default_rng(5)
    y = kernels.softmax(rng.standard_normal((3, 6)).astype(dtype))
    dy = rng.standard_normal((3, 6)).astype(dtype)
    jacobian = np.einsum("ri,ij->rij", y, np.eye(6)) - np.einsum("ri,rj->rij", y, y)  # dy_i/dx_j
    want = np.einsum("rij,ri->rj", jacobian, dy)
    np.testing.assert_allclose(kernels.softmax_backward(y, dy), want, **TOLERANCE[np.dtype(dtype)])


# ---- errors name the argument -------------------------------------------------------------


def test_matmul_rejects_integer_arrays(backend):
    with pytest.raises(TypeError, match=r"matmul: a has dtype int64 but float32 or float64 was expected"):
        kernels.matmul(np.ones((2, 2), np.int64), np.ones((2, 2), np.float32))


def test_matmul_rejects_half_precision(backend):
    with pytest.raises(TypeError, match=r"matmul: b has dtype float16"):
        kernels.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float16))


def test_matmul_never_casts_mixed_dtypes(backend):
    with pytest.raises(TypeError, match=r"matmul: a is float32 but b is float64"):
        kernels.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float64))


def test_matmul_rejects_byte_swapped_floats(backend):
    with pytest.raises(TypeError, match=r"matmul: a has dtype >f4"):
        kernels.matmul(np.ones((2, 2), ">f4"), np.ones((2, 2), np.float32))


def test_matmul_refuses_a_result_too_big_to_address(backend):
    column = np.broadcast_to(np.ones((1, 1), np.float32), (2**31, 1))  # no memory behind it
    with pytest.raises(ValueError, match=r"matmul: a has shape \(2147483648, 1\).*more than minqkv can address"):
        kernels.matmul(column, column, trans_b=True)


def test_matmul_rejects_lists(backend):
    with pytest.raises(TypeError, match=r"matmul: b must be a numpy.ndarray"):
        kernels.matmul(np.ones((2, 2)), [[1.0, 2.0], [3.0, 4.0]])


def test_matmul_shape_mismatch_names_both_shapes(backend):
    expected = "matmul: a has shape (3, 4) but b has shape (5, 2); inner dimensions 4 and 5 must match"
    with pytest.raises(ValueError) as error:
        kernels.matmul(np.ones((3, 4)), np.ones((5, 2)))
    assert str(error.value) == expected


def test_matmul_shape_mismatch_mentions_transpose_flags(backend):
    with pytest.raises(ValueError, match=r"b has shape \(4, 2\), trans_b=True; inner dimensions 4 and 2"):
        kernels.matmul(np.ones((3, 4)), np.ones((4, 2)), trans_b=True)


@pytest.mark.parametrize("a_shape, b_shape", [((4,), (4, 2)), ((3, 4), (2, 4, 5)), ((1, 2, 3, 4), (1, 2, 4, 3))])
def test_matmul_wrong_ndim_names_both_shapes(backend, a_shape, b_shape):
    with pytest.raises(ValueError, match=rf"matmul: a has shape {a_shape} and b has shape {b_shape}".replace("(", r"\(").replace(")", r"\)")):
        kernels.matmul(np.ones(a_shape), np.ones(b_shape))


def test_matmul_batch_mismatch(backend):
    with pytest.raises(ValueError, match=r"batch sizes 2 and 3 must match"):
        kernels.matmul(np.ones((2, 3, 4)), np.ones((3, 4, 5)))


def test_softmax_rejects_integers(backend):
    with pytest.raises(TypeError, match=r"softmax: x has dtype int32"):
        kernels.softmax(np.ones((2, 2), np.int32))


def test_softmax_needs_an_axis(backend):
    with pytest.raises(ValueError, match=r"softmax: x must have at least 1 dimension"):
        kernels.softmax(np.array(1.0))


def test_causal_softmax_needs_two_axes(backend):
    with pytest.raises(ValueError, match=r"softmax: causal=True needs x with at least 2 dimensions"):
        kernels.softmax(np.ones(4), causal=True)


def test_softmax_backward_shape_mismatch(backend):
    with pytest.raises(ValueError, match=r"softmax_backward: y has shape \(2, 3\) but dy has shape \(3, 2\)"):
        kernels.softmax_backward(np.ones((2, 3)), np.ones((3, 2)))


def test_softmax_backward_mixed_dtypes(backend):
    with pytest.raises(TypeError, match=r"softmax_backward: y is float64 but dy is float32"):
        kernels.softmax_backward(np.ones((2, 3)), np.ones((2, 3), np.float32))


def test_softmax_backward_rejects_integer_gradient(backend):
    with pytest.raises(TypeError, match=r"softmax_backward: dy has dtype int64"):
        kernels.softmax_backward(np.ones((2, 3)), np.ones((2, 3), np.int64))


# ---- the registry, backend and threads -------------------------------------------------------


def test_every_kernel_has_both_twins_with_one_signature():
    assert set(kernels.KERNELS) == set(kernels.BACKENDS)
    assert set(kernels.KERNELS["c"]) == set(kernels.KERNELS["numpy"])
    for name, reference in kernels.KERNELS["numpy"].items():
        twin = kernels.KERNELS["c"][name]
        assert (reference.__name__, twin.__name__) == (f"{name}_numpy", f"{name}_c")
        assert inspect.signature(twin) == inspect.signature(reference) == inspect.signature(getattr(kernels, name))


def test_a_kernel_runs_the_function_the_registry_names_for_the_backend(backend, monkeypatch):
    calls = []
    monkeypatch.setitem(kernels.KERNELS[backend], "gelu", lambda x: calls.append(x) or "ran")
    assert kernels.gelu(1.5) == "ran" and calls == [1.5]


def test_bad_backend_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'cuda' is not a minqkv backend: use one of 'c', 'numpy'"):
        kernels.set_backend("cuda")


def test_bad_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("MINQKV_BACKEND", "fortran")
    with pytest.raises(ValueError, match=r"MINQKV_BACKEND 'fortran' is not a minqkv backend"):
        runtime._initial_backend()


@pytest.mark.parametrize("value, chosen", [(None, "c"), ("", "c"), ("numpy", "numpy"), (" NumPy ", "numpy"),
                                           ("C", "c")])
def test_initial_backend_follows_the_environment(monkeypatch, value, chosen):
    if value is None:
        monkeypatch.delenv("MINQKV_BACKEND", raising=False)
    else:
        monkeypatch.setenv("MINQKV_BACKEND", value)
    if chosen == "c" and not kernels.HAVE_C:
        chosen = "numpy"  # and a loud warning, tested below
    assert runtime._initial_backend() == chosen


def test_asking_for_c_without_the_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(runtime, "HAVE_C", False)
    monkeypatch.setattr(runtime, "_IMPORT_ERROR", ImportError("no module"))
    with pytest.raises(RuntimeError, match=r"backend 'c' is not available.*pip install -e"):
        kernels.set_backend("c")
    with pytest.raises(RuntimeError, match=r"matmul_c: the C core is not available.*or use matmul_numpy"):
        kernels.matmul_c(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(RuntimeError, match=r"matmul_naive_c: the C core is not available.*or use matmul_numpy"):
        kernels.matmul_naive_c(np.ones((2, 2)), np.ones((2, 2)))


def test_missing_extension_falls_back_to_numpy_with_one_loud_warning():
    code = ("import sys, warnings; sys.modules['minqkv._ccore'] = None\n"
            "warnings.simplefilter('always')\n"
            "import numpy as np, minqkv.kernels as k\n"
            "print(k.HAVE_C, k.get_backend(), k.matmul(np.eye(2), np.eye(2)).sum())\n")
    done = _run_python(code, MINQKV_BACKEND="")  # "" means the default, 'c'
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "numpy", "2.0"]
    assert done.stderr.count("the C core (minqkv._ccore) is not built") == 2  # the print and the warning
    assert "pip install -e ." in done.stderr


def _matmul_in_child(a, queue):
    queue.put((kernels.get_num_threads(), kernels.matmul(a, a)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_forked_child_runs_kernels_on_one_thread_instead_of_hanging(backend, threads):
    import multiprocessing

    threads(2)
    a = np.random.default_rng(8).standard_normal((420, 420)).astype(np.float32)
    kernels.matmul(a, a)  # big enough for the parent to start its OpenMP threads
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_matmul_in_child, args=(a, queue))
    child.start()
    try:
        child_threads, product = queue.get(timeout=60)  # read before join: the pipe is small
    finally:
        child.join(10)
        if child.exitcode is None:
            child.kill()
    assert child.exitcode == 0
    assert child_threads == 1 and kernels.get_num_threads() == 2
    np.testing.assert_array_equal(product, kernels.matmul(a, a))


@pytest.mark.parametrize("n", [0, -2, 2.0, "4", True, None])
def test_thread_count_must_be_a_whole_number_of_at_least_one(threads, n):
    with pytest.raises(ValueError, match=r"set_num_threads: n must be a whole number >= 1, got"):
        threads(n)


def test_set_num_threads_keeps_the_count_it_is_given(threads):
    threads(np.int64(3))
    assert kernels.get_num_threads() == 3 and type(kernels.get_num_threads()) is int


@needs_c
def test_a_huge_thread_count_is_capped_and_the_kernels_still_run(threads):
    threads(10**30)
    assert kernels.get_num_threads() == kernels.MAX_NUM_THREADS
    a = np.random.default_rng(10).standard_normal((330, 330)).astype(np.float32)  # big enough to thread
    assert np.all(np.abs(kernels.matmul_c(a, a) - a @ a) <= gemm_error_bound(a, a, 330))


@pytest.mark.parametrize("value", ["0", "-3", "four", "2.5", "1e3", "\u00b2", "4 threads"])
def test_bad_num_threads_environment_variable_names_it(monkeypatch, value):
    monkeypatch.setenv("MINQKV_NUM_THREADS", value)
    with pytest.raises(ValueError, match=rf"MINQKV_NUM_THREADS='{value}' is not a thread count: use a whole number"):
        runtime._initial_num_threads()


@pytest.mark.parametrize("value, count", [("3", 3), (" 2 ", 2), ("1", 1)])
def test_num_threads_environment_variable_sets_the_count(monkeypatch, value, count):
    monkeypatch.setenv("MINQKV_NUM_THREADS", value)
    assert runtime._initial_num_threads() == count


@needs_c
def test_a_huge_num_threads_environment_variable_is_capped_before_the_first_matmul():
    code = ("import numpy as np, minqkv.kernels as k\n"
            "a = np.ones((330, 330), np.float32)\n"
            "print(k.get_num_threads() == k.MAX_NUM_THREADS, k.matmul_c(a, a)[0, 0])\n")
    done = _run_python(code, MINQKV_NUM_THREADS="99999999999")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "330.0"]


def test_a_bad_num_threads_environment_variable_stops_the_import_with_its_name():
    done = _run_python("import minqkv.kernels", MINQKV_NUM_THREADS="two")
    assert done.returncode != 0
    assert "ValueError: MINQKV_NUM_THREADS='two' is not a thread count" in done.stderr


def test_bench_rows_and_table_have_the_documented_fields():
    from minqkv.lab.bench import format_table, run_bench

    rows = run_bench(repeats=1, warmup=0, rounds=1, settle=0.0)
    units = {row["unit"] for row in rows}
    assert units == {"GFLOPS", "GB/s"}
    for row in rows:
        assert {"bench", "dtype", "shape", "minqkv", "reference", "ratio", "unit"} <= set(row)
        assert row["minqkv"] > 0 and row["reference"] > 0 and row["ratio"] > 0
    table = format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["bench", "dtype", "shape"]
    assert len(table.splitlines()) == len(rows) + 3  # header, rule, rows, footer


def test_step_bench_times_minqkv_and_says_when_torch_is_absent():
    from minqkv.lab.bench_step import format_step_table, run_step_bench

    rows = run_step_bench(threads=(1, 2), shapes=("nanogpt-cpu",), rounds=2, steps_per_round=1, warmup=0,
                          with_torch=False)
    assert [row["threads"] for row in rows] == [1, 2]
    for row in rows:
        assert row["minqkv_ms"] > 0 and row["minqkv_peak_mb"] > 0 and "ratio" not in row
        assert row["minqkv_speedup"] == round(rows[0]["minqkv_ms"] / row["minqkv_ms"], 3)
    assert rows[0]["minqkv_speedup"] == 1.0
    table = format_step_table(rows)
    assert "PyTorch is not installed" in table and "speed-up" in table.splitlines()[0]


def test_step_bench_refuses_an_unknown_shape():
    from minqkv.lab.bench_step import run_step_bench

    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        run_step_bench(shapes=("huge",), with_torch=False)


# ---- memory kept for reuse ----------------------------------------------------------------

# In a fresh interpreter: allocate and touch eight 8 MiB arrays, free them all, ten times over (as
# a training step does), and count the page faults of the last nine rounds; the first pays for
# its pages however malloc is set up.
_FAULTS_OF_REUSE = ("import resource, numpy as np, minqkv.kernels as k\n"
                    "def round():\n"
                    "    arrays = [np.ones(2 << 20, np.float32) for _ in range(8)]\n"
                    "round()\n"
                    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
                    "for _ in range(9):\n"
                    "    round()\n"
                    "print(k.KEEPS_FREED_MEMORY, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the malloc settings are glibc's")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer replaces glibc's malloc, and with it these settings")
def test_freed_arrays_are_reused_without_page_faults_unless_switched_off():
    kept, faults = _run_python(_FAULTS_OF_REUSE).stdout.split()
    assert kept == "True" and int(faults) < 1000
    kept, faults = _run_python(_FAULTS_OF_REUSE, MINQKV_KEEP_MEMORY="0").stdout.split()
    assert kept == "False" and int(faults) > 9 * 2048  # glibc trims: at least one array (2048 pages) a round



def _wait_policy_seen_by_libgomp(**settings):
    env = {name: value for name, value in os.environ.items()
           if name not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MINQKV_WAIT_POLICY")}
    code = "import os, minqkv.kernels\nprint(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **settings},
                          cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_wait_policy_is_left_to_libgomp_on_spin_and_set_passive_on_passive():
    assert _wait_policy_seen_by_libgomp(MINQKV_WAIT_POLICY="spin") == ["None", "None"]
    assert _wait_policy_seen_by_libgomp(MINQKV_WAIT_POLICY="passive") == ["None", "PASSIVE"]
    # the user's own OpenMP setting always wins
    assert _wait_policy_seen_by_libgomp(MINQKV_WAIT_POLICY="passive", OMP_WAIT_POLICY="ACTIVE") == ["None", "ACTIVE"]


@pytest.mark.skipif(sys.platform == "win32", reason="MSVC takes other flags")
def test_the_build_lets_gcc_vectorise_loops_with_floating_point_conditions(monkeypatch):
    """Without -fno-trapping-math GCC keeps every loop with a floating-point condition scalar (exp's
    clamp, tanh's sign, the causal mask): GELU and the softmaxes ran at scalar speed on every CPU.
    Without -fno-math-errno every sqrt stays a library call. Both in the sanitized build too."""
    from minqkv import _build

    for sanitize in ("0", "1"):
        monkeypatch.setenv("MINQKV_SANITIZE", sanitize)
        compile_args, _, _ = _build.build_flags()
        assert "-fno-trapping-math" in compile_args and "-fno-math-errno" in compile_args, compile_args
