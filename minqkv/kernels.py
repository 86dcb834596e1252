"""The Python face of minqkv's C core: matmul, softmax and softmax_backward.

Each kernel exists twice with the same signature and meaning:
  matmul_c, softmax_c, softmax_backward_c              the C core (csrc/, through cffi)
  matmul_numpy, softmax_numpy, softmax_backward_numpy  a few lines of NumPy: the reference
and `matmul`, `softmax`, `softmax_backward` call one or the other according to the backend:

  set_backend("numpy")   # or "c"; the first value comes from $MINQKV_BACKEND (default "c")

Every entry point checks its arguments first and raises a TypeError or ValueError that names
the argument: dtypes must be float32 or float64 and agree (nothing is cast silently), shapes
must fit together. Arrays the C code cannot take as they are (strided, misaligned) are copied,
and the result is always a new C-contiguous array allocated here, by NumPy.

If the extension minqkv._ccore was not built (no C compiler at install time), everything runs
on the NumPy twins and a warning says so once.

matmul_naive_c is a third GEMM: the C core's plain three-loop version (csrc/gemm_template.h),
the readable reference for the fast one. Same numbers up to rounding, much slower; nothing
calls it but tests and lessons.

Threads: the C kernels use MINQKV_NUM_THREADS threads (default: every core this process may
use, at most MAX_NUM_THREADS); change it with set_num_threads(n). Each call reads the count
once, so Python threads may run kernels while another one changes it. The OpenMP thread pool
does not survive fork(), so a fork()ed child runs the kernels on one thread; workers that should
use threads are started with multiprocessing's 'spawn' method, and processes that run side by
side are best given MINQKV_NUM_THREADS=1 each.
"""

import collections
import os
import sys
import warnings

import numpy as np

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). Spinning
# saves microseconds per call on an idle machine but, on a small or shared one, a spinning
# thread takes a core from NumPy's BLAS threads or another process, and calls then stall for
# whole scheduler time slices. OpenMP reads this once, when the extension first loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from ._ccore import ffi as _ffi
    from ._ccore import lib as _lib

    HAVE_C = True
    _IMPORT_ERROR = None
except ImportError as _error:
    _ffi = _lib = None
    HAVE_C = False
    _IMPORT_ERROR = _error

BACKENDS = ("c", "numpy")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT32, _FLOAT64 = FLOAT_DTYPES
_MAX_ELEMENTS = np.iinfo(np.int64).max // 16  # so that byte offsets in C cannot overflow
MAX_NUM_THREADS = 1024  # larger requests are capped: far beyond any useful count, and a C int

_BUILD_HINT = "build it with `pip install -e .` in the minqkv checkout (this needs a C compiler)"


# ---- backend and threads ---------------------------------------------------------------


def _check_backend_name(name, source="backend"):
    if name not in BACKENDS:
        raise ValueError(f"{source} {name!r} is not a minqkv backend: use one of "
                         + ", ".join(repr(b) for b in BACKENDS))


def _initial_backend():
    name = os.environ.get("MINQKV_BACKEND", "c").strip().lower() or "c"
    _check_backend_name(name, "MINQKV_BACKEND")
    if name == "c" and not HAVE_C:
        message = (f"minqkv: the C core (minqkv._ccore) is not built ({_IMPORT_ERROR}); "
                   f"running on the slow NumPy twins instead. To get it, {_BUILD_HINT}. "
                   "Set MINQKV_BACKEND=numpy to choose NumPy and silence this.")
        print(message, file=sys.stderr)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return "numpy"
    return name


def _initial_num_threads():
    """MINQKV_NUM_THREADS, checked when minqkv is imported, or every core this process may use."""
    text = os.environ.get("MINQKV_NUM_THREADS", "").strip()
    if text:
        # isascii: str.isdigit also accepts digits like '²' that int() refuses
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise ValueError(f"MINQKV_NUM_THREADS={text!r} is not a thread count: use a whole number "
                             f">= 1, e.g. MINQKV_NUM_THREADS=4 (counts above {MAX_NUM_THREADS} are capped)")
        return min(int(text), MAX_NUM_THREADS)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(cores, MAX_NUM_THREADS)


_backend = _initial_backend()
_num_threads = _initial_num_threads()


def _one_thread_after_fork():
    # OpenMP's threads do not exist in a fork()ed child and waiting for them would hang it,
    # so a child runs the kernels on its own thread (start workers with 'spawn' for threads).
    global _num_threads
    _num_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)


def set_backend(name):
    """Run matmul/softmax/softmax_backward on 'c' (the C core) or 'numpy' (the NumPy twins)."""
    global _backend
    _check_backend_name(name)
    if name == "c" and not HAVE_C:
        raise RuntimeError(f"backend 'c' is not available: the extension minqkv._ccore could not be "
                           f"imported ({_IMPORT_ERROR}). To get it, {_BUILD_HINT}.")
    _backend = name


def get_backend():
    """The backend in use: 'c' or 'numpy'."""
    return _backend


def set_num_threads(n):
    """How many threads each C kernel may use (small problems use one whatever this says);
    counts above MAX_NUM_THREADS are capped."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"set_num_threads: n must be a whole number >= 1, got {n!r}")
    _num_threads = int(min(n, MAX_NUM_THREADS))


def get_num_threads():
    """The number of threads the C kernels may use."""
    return _num_threads


# ---- argument checks (shared by both backends, so errors read the same) ---------------


def _check_float_array(op, name, x):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{op}: {name} must be a numpy.ndarray of float32 or float64, "
                        f"got {type(x).__name__}")
    if x.dtype is not _FLOAT32 and x.dtype is not _FLOAT64 and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {x.dtype} but float32 or float64 was expected; "
                        f"minqkv never casts silently, convert it first, e.g. {name}.astype(np.float32)")


def _check_same_dtype(op, name_a, a, name_b, b):
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {name_a} is {a.dtype} but {name_b} is {b.dtype}; both must have "
                        f"the same dtype (minqkv never casts silently), convert one with .astype()")


def _matmul_sizes(a, b, trans_a, trans_b, op="matmul"):
    """Check the arguments of matmul (or of op, a variant of it); return (batch or None, M, N, K)."""
    _check_float_array(op, "a", a)
    _check_float_array(op, "b", b)
    _check_same_dtype(op, "a", a, "b", b)
    if not ((a.ndim == 2 and b.ndim == 2) or (a.ndim == 3 and b.ndim == 3)):
        raise ValueError(f"{op}: a has shape {a.shape} and b has shape {b.shape}; they must be both "
                         "2-D, (M, K) @ (K, N), or both 3-D, (batch, M, K) @ (batch, K, N)")
    if a.ndim == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: a has shape {a.shape} but b has shape {b.shape}; batch sizes "
                         f"{a.shape[0]} and {b.shape[0]} must match")
    M, K = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    K_b, N = (b.shape[-1], b.shape[-2]) if trans_b else (b.shape[-2], b.shape[-1])
    if K != K_b:
        flags = "".join(f", {flag}=True" for flag, on in (("trans_a", trans_a), ("trans_b", trans_b)) if on)
        raise ValueError(f"{op}: a has shape {a.shape} but b has shape {b.shape}{flags}; "
                         f"inner dimensions {K} and {K_b} must match")
    batch = a.shape[0] if a.ndim == 3 else None
    if (batch or 1) * M * N > _MAX_ELEMENTS:
        raise ValueError(f"{op}: a has shape {a.shape} and b has shape {b.shape}; the product would "
                         f"have {(batch or 1) * M * N} elements, more than minqkv can address")
    return batch, M, N, K


def _check_softmax(x, causal):
    _check_float_array("softmax", "x", x)
    if x.ndim < 1:
        raise ValueError("softmax: x must have at least 1 dimension, got a 0-d array")
    if causal and x.ndim < 2:
        raise ValueError(f"softmax: causal=True needs x with at least 2 dimensions (..., Tq, Tk), "
                         f"got shape {x.shape}")


def _check_softmax_backward(y, dy):
    _check_float_array("softmax_backward", "y", y)
    _check_float_array("softmax_backward", "dy", dy)
    _check_same_dtype("softmax_backward", "y", y, "dy", dy)
    if y.shape != dy.shape:
        raise ValueError(f"softmax_backward: y has shape {y.shape} but dy has shape {dy.shape}; "
                         "they must be the same")
    if y.ndim < 1:
        raise ValueError("softmax_backward: y and dy must have at least 1 dimension, got 0-d arrays")


# ---- the NumPy twins ------------------------------------------------------------------


def matmul_numpy(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) with NumPy; op transposes the last two axes when asked."""
    _matmul_sizes(a, b, trans_a, trans_b)
    op_a = np.swapaxes(a, -1, -2) if trans_a else a
    op_b = np.swapaxes(b, -1, -2) if trans_b else b
    return np.ascontiguousarray(np.matmul(op_a, op_b))


def softmax_numpy(x, causal=False):
    """Softmax over the last axis; causal hides key j from query i when j > i + (Tk - Tq)."""
    _check_softmax(x, causal)
    if x.size == 0:
        return np.empty(x.shape, x.dtype)
    if causal:
        Tq, Tk = x.shape[-2:]
        visible = np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)  # (Tq, Tk)
        x = np.where(visible, x, -np.inf).astype(x.dtype, copy=False)
    with np.errstate(invalid="ignore"):  # inf - inf in a row holding +inf: NaN, as intended
        row_max = x.max(axis=-1, keepdims=True)
        row_max = np.where(np.isneginf(row_max), 0, row_max)  # all -inf rows: exp gives zeros
        e = np.exp(x - row_max)
        total = e.sum(axis=-1, keepdims=True)
        return e / np.where(total == 0, 1, total)


def softmax_backward_numpy(y, dy):
    """dx = y * (dy - sum(dy * y)) over the last axis, the gradient through y = softmax(x)."""
    _check_softmax_backward(y, dy)
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


# ---- the C core ---------------------------------------------------------------------------


def _require_c(op, twin=None):
    if not HAVE_C:
        raise RuntimeError(f"{op}_c: the C core is not available (minqkv._ccore could not be imported: "
                           f"{_IMPORT_ERROR}). To get it, {_BUILD_HINT}; or use {twin or op + '_numpy'}.")


# The C functions of one dtype, and ctype, the cffi array type of its elements.
_CKernels = collections.namedtuple("_CKernels", "ctype gemm gemm_workspace gemm_naive softmax softmax_backward")


def _c_kernels(dtype):
    """The C functions for a checked float dtype: 'f' is float32, 'd' float64."""
    if dtype.char == "f":
        return _CKernels("float[]", _lib.minqkv_gemm_f32, _lib.minqkv_gemm_workspace_f32, _lib.minqkv_gemm_naive_f32,
                         _lib.minqkv_softmax_f32, _lib.minqkv_softmax_backward_f32)
    return _CKernels("double[]", _lib.minqkv_gemm_f64, _lib.minqkv_gemm_workspace_f64, _lib.minqkv_gemm_naive_f64,
                     _lib.minqkv_softmax_f64, _lib.minqkv_softmax_backward_f64)


def _check_status(op, status):
    if status != _lib.MINQKV_OK:
        raise RuntimeError(f"{op}: the C core refused its arguments (status {status}); "
                           "this is a bug in minqkv/kernels.py")


def _contiguous(x):
    """x itself if C can read it as is (C-contiguous, aligned), else an aligned C-order copy."""
    if x.flags.c_contiguous and x.flags.aligned:
        return x
    return np.array(x, order="C", copy=True)


def _matrix_operand(x, trans):
    """How to hand a stack of matrices x (batch, rows, cols) to the GEMM without a copy when
    possible. Returns (array, trans, batch_stride) where array is C-contiguous and aligned:
    - x C-contiguous: as is;
    - each matrix transposed in memory (e.g. w.T): pass the transpose and flip trans instead;
    - one matrix repeated over the batch (stride 0, from np.broadcast_to): pass it once;
    - anything else: a C-order copy."""
    if x.flags.aligned:
        if x.flags.c_contiguous:
            return x, trans, x.shape[1] * x.shape[2]
        swapped = np.swapaxes(x, 1, 2)
        if swapped.flags.c_contiguous:
            return swapped, not trans, x.shape[1] * x.shape[2]
        if x.shape[0] > 1 and x.strides[0] == 0:
            first = x[:1]
            if first.flags.c_contiguous:
                return first, trans, 0
            if np.swapaxes(first, 1, 2).flags.c_contiguous:
                return np.swapaxes(first, 1, 2), not trans, 0
    return np.array(x, order="C", copy=True), trans, x.shape[1] * x.shape[2]


def _gemm_c(op, a, b, trans_a, trans_b, naive):
    """The body of matmul_c and matmul_naive_c: check, hand the operands over, call C."""
    _require_c(op, twin="matmul_numpy")
    trans_a, trans_b = bool(trans_a), bool(trans_b)
    batch, M, N, K = _matmul_sizes(a, b, trans_a, trans_b, op)
    stacked = batch is not None
    batch = batch if stacked else 1
    out = np.empty((batch, M, N) if stacked else (M, N), a.dtype)
    if out.size == 0:
        return out
    if K == 0:  # an empty sum
        out.fill(0)
        return out
    a3, trans_a, stride_a = _matrix_operand(a if stacked else a[None], trans_a)
    b3, trans_b, stride_b = _matrix_operand(b if stacked else b[None], trans_b)
    c = _c_kernels(a.dtype)
    pointer = _ffi.from_buffer  # a C view of an array's memory, valid while the array lives
    operands = (trans_a, trans_b, batch, M, N, K,
                pointer(c.ctype, a3), a3.shape[2], stride_a,
                pointer(c.ctype, b3), b3.shape[2], stride_b,
                pointer(c.ctype, out), N, M * N)
    if naive:
        status = c.gemm_naive(*operands)
    else:
        # read once: the workspace must be sized for the very count C is given, even if
        # another Python thread calls set_num_threads meanwhile
        num_threads = _num_threads
        workspace = np.empty(c.gemm_workspace(batch, M, N, K, num_threads), a.dtype)
        status = c.gemm(*operands, pointer(c.ctype, workspace), workspace.size, num_threads)
    _check_status(op, status)
    return out


def matmul_c(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) on the C core's fast GEMM; same contract as matmul."""
    return _gemm_c("matmul", a, b, trans_a, trans_b, naive=False)


def matmul_naive_c(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) on the C core's naive three-loop GEMM, the readable reference for the fast
    one (minqkv_gemm_naive_f32/_f64); same contract as matmul, on one thread, slow."""
    return _gemm_c("matmul_naive", a, b, trans_a, trans_b, naive=True)


def softmax_c(x, causal=False):
    """Softmax over the last axis on the C core; same contract as softmax."""
    _require_c("softmax")
    _check_softmax(x, causal)
    out = np.empty(x.shape, x.dtype)
    if x.size == 0:
        return out
    x = _contiguous(x)
    Tk = x.shape[-1]
    Tq = x.shape[-2] if causal else 1
    batch = x.size // (Tq * Tk)
    c = _c_kernels(x.dtype)
    status = c.softmax(_ffi.from_buffer(c.ctype, x), _ffi.from_buffer(c.ctype, out), batch, Tq, Tk,
                       bool(causal), _num_threads)
    _check_status("softmax", status)
    return out


def softmax_backward_c(y, dy):
    """dx = y * (dy - sum(dy * y)) on the C core; same contract as softmax_backward."""
    _require_c("softmax_backward")
    _check_softmax_backward(y, dy)
    dx = np.empty(y.shape, y.dtype)
    if y.size == 0:
        return dx
    y, dy = _contiguous(y), _contiguous(dy)
    n = y.shape[-1]
    c = _c_kernels(y.dtype)
    status = c.softmax_backward(_ffi.from_buffer(c.ctype, y), _ffi.from_buffer(c.ctype, dy),
                                _ffi.from_buffer(c.ctype, dx), y.size // n, n, _num_threads)
    _check_status("softmax_backward", status)
    return dx


# ---- dispatch -------------------------------------------------------------------------------


def matmul(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b): a, b both 2-D (M, K) @ (K, N) or both 3-D (batch, M, K) @ (batch, K, N),
    with op(x) = x, or its last two axes swapped when trans_x is true. Same float dtype in and
    out; returns a new C-contiguous array."""
    if _backend == "c":
        return matmul_c(a, b, trans_a, trans_b)
    return matmul_numpy(a, b, trans_a, trans_b)


def softmax(x, causal=False):
    """Softmax over the last axis of x (float32/float64, ndim >= 1); returns a new array.

    causal=True treats the last two axes as (Tq, Tk) and lets query i see key j only when
    j <= i + (Tk - Tq), so the last query sees every key (decoding with a KV cache). A row with
    nothing to see, or only -inf, gives zeros; a row holding NaN gives NaN."""
    if _backend == "c":
        return softmax_c(x, causal)
    return softmax_numpy(x, causal)


def softmax_backward(y, dy):
    """Gradient through y = softmax(x): dx = y * (dy - sum(dy * y)) over the last axis."""
    if _backend == "c":
        return softmax_backward_c(y, dy)
    return softmax_backward_numpy(y, dy)
