"""The Python face of minqkv's C core: matmul, softmax, GELU, layer norm, cross-entropy, AdamW.

Each kernel exists twice with the same signature and meaning:
  matmul_c, softmax_c, softmax_backward_c              the C core (csrc/, through cffi)
  matmul_numpy, softmax_numpy, softmax_backward_numpy  a few lines of NumPy: the reference
(and so on for gelu, gelu_backward, layer_norm, layer_norm_backward, cross_entropy,
embedding_backward, adamw_update, attention, attention_backward),
and `matmul`, `softmax`, ... call one or the other according to the backend:

  set_backend("numpy")   # or "c"; the first value comes from $MINQKV_BACKEND (default "c")

Every entry point checks its arguments first and raises a TypeError or ValueError that names
the argument: dtypes must be float32 or float64 and agree (nothing is cast silently), shapes
must fit together. Arrays the C code cannot take as they are (strided, misaligned) are copied,
and the result is always a new array allocated here, by NumPy: C-contiguous, except that the
fused attention reads strided heads where they lie and stores its outputs token by token
(see attention).

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
import functools
import os
import sys
import warnings

import numpy as np

# minqkv leaves OpenMP's wait policy to libgomp's default (idle threads spin for milliseconds
# before they sleep) or to the user's OMP_WAIT_POLICY / GOMP_SPINCOUNT. Measured on 2 cores, 2
# threads: sleeping at once (PASSIVE) makes every kernel call wake its threads, which kept small
# GEMMs on one thread, and shorter spins (3,000 or 10,000) let the threads fall asleep between
# calls made back to back from Python, erratically (the (768,128)@(128,128) GEMM at 0.18-0.33x
# OpenBLAS in some runs, 1.02-1.05x in others). The price of the default is paid on a machine
# shared with busy processes: a thread spins through its time slice waiting for one that is not
# running. A training step of the nanoGPT shape beside two busy processes took 844 ms with the
# default and 62-133 ms with OMP_WAIT_POLICY=PASSIVE, which is what to set on such a machine.

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

# glibc gives large freed blocks back to the system: those above its mmap threshold (128 KiB at
# first, raised only as far as the largest block freed so far) and whatever sits free at the top
# of the heap beyond its trim threshold. A training step frees and allocates the same large
# arrays every time, so it page-faulted on them again: 14,000-17,700 faults per step of the
# default model, 7-18% of the step (2 cores). Raising both thresholds keeps freed memory in the
# process for the next step; the peak is unchanged, memory is only kept.
# MINQKV_KEEP_MEMORY=0 leaves glibc's defaults.
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit for this setting on 64-bit
TRIM_THRESHOLD_BYTES = 256 << 20


def _keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for reuse; True if it was told (glibc only)."""
    if os.environ.get("MINQKV_KEEP_MEMORY", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


KEEPS_FREED_MEMORY = _keep_freed_memory()


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


def _check_same_shape(op, name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{op}: {name_a} has shape {a.shape} but {name_b} has shape {b.shape}; "
                         "they must be the same")


def _check_gelu_backward(x, dy):
    for name, array in (("x", x), ("dy", dy)):
        _check_float_array("gelu_backward", name, array)
    _check_same_dtype("gelu_backward", "x", x, "dy", dy)
    _check_same_shape("gelu_backward", "x", x, "dy", dy)


def _check_layer_norm(x, weight, bias, eps):
    _check_float_array("layer_norm", "x", x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x must have a last axis of at least 1 element, got shape {x.shape}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None and name == "bias":
            continue
        _check_float_array("layer_norm", name, param)
        _check_same_dtype("layer_norm", "x", x, name, param)
        if param.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm: {name} has shape {param.shape} but x {x.shape} needs "
                             f"({x.shape[-1]},)")
    if not eps >= 0:
        raise ValueError(f"layer_norm: eps must be >= 0, got {eps}")


def _check_layer_norm_backward(x, weight, mean, rstd, dy, has_bias):
    _check_layer_norm(x, weight, None, 0.0)
    for name, array in (("mean", mean), ("rstd", rstd), ("dy", dy)):
        _check_float_array("layer_norm_backward", name, array)
        _check_same_dtype("layer_norm_backward", "x", x, name, array)
    _check_same_shape("layer_norm_backward", "x", x, "dy", dy)
    for name, array in (("mean", mean), ("rstd", rstd)):
        if array.shape != x.shape[:-1] + (1,):
            raise ValueError(f"layer_norm_backward: {name} has shape {array.shape} but x {x.shape} "
                             f"needs {x.shape[:-1] + (1,)} (as layer_norm returns it)")


def _check_rows_and_ids(op, rows_name, rows, ids_name, ids):
    """rows: a float array (P, width) with width >= 1; ids: integers (P,), one for each row."""
    _check_float_array(op, rows_name, rows)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"{op}: {rows_name} must be 2-D with at least one column, got shape {rows.shape}")
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise TypeError(f"{op}: {ids_name} must be a numpy array of integers")
    if ids.shape != rows.shape[:1]:
        raise ValueError(f"{op}: {ids_name} have shape {ids.shape} but {rows_name} {rows.shape} "
                         f"need ({rows.shape[0]},)")


def _check_cross_entropy(logits, targets, ignore_index):
    _check_rows_and_ids("cross_entropy", "logits", logits, "targets", targets)
    V = logits.shape[1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) or equal ignore_index="
                         f"{ignore_index}; found {targets[bad][0]}")


def _check_embedding_backward(ids, rows, n):
    _check_rows_and_ids("embedding_backward", "rows", rows, "ids", ids)
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"embedding_backward: n (the rows of the table) must be an integer >= 0, got {n!r}")
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"embedding_backward: ids must lie in [0, {n}), "
                         f"got values from {ids.min()} to {ids.max()}")


def _check_adamw(param, grad, m, v, bias2_sqrt):
    for name, array in (("param", param), ("grad", grad), ("m", m), ("v", v)):
        _check_float_array("adamw_update", name, array)
        _check_same_dtype("adamw_update", "param", param, name, array)
        _check_same_shape("adamw_update", "param", param, name, array)
        if name != "grad" and not array.flags.writeable:
            raise ValueError(f"adamw_update: {name} is updated in place but is read-only")
    if not bias2_sqrt > 0:
        raise ValueError(f"adamw_update: bias2_sqrt must be > 0, got {bias2_sqrt}")


def _check_attention(op, q, k, v, bias, extra=()):
    """q (B, H, T, hd), k and v (B, Hkv, Tk, hd), bias (H, T, Tk) or None; extra: (name, array,
    shape) of further arrays that must have that shape and q's dtype."""
    for name, array in (("q", q), ("k", k), ("v", v)) + tuple((n, a) for n, a, _ in extra):
        _check_float_array(op, name, array)
        _check_same_dtype(op, "q", q, name, array)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{op}: q, k and v must be 4-D (B, heads, T, hd), got shapes {q.shape}, "
                         f"{k.shape}, {v.shape}")
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != hd:
        raise ValueError(f"{op}: k {k.shape} and v {v.shape} must both be (B={B}, Hkv, Tk, hd={hd}) "
                         f"for q {q.shape}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{op}: q has {H} heads but k and v have {Hkv}; the key/value heads must "
                         "divide the query heads (grouped-query attention)")
    if Tk < T or hd == 0:
        raise ValueError(f"{op}: k and v have Tk={Tk} positions for T={T} queries and head width "
                         f"{hd}; causal attention needs Tk >= T and hd >= 1")
    if bias is not None:
        _check_float_array(op, "bias", bias)
        _check_same_dtype(op, "q", q, "bias", bias)
        if bias.shape != (H, T, Tk):
            raise ValueError(f"{op}: bias has shape {bias.shape} but must be (H, T, Tk) = {(H, T, Tk)}")
    for name, array, shape in extra:
        if array.shape != shape:
            raise ValueError(f"{op}: {name} has shape {array.shape} but must be {shape}")


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


_GELU_C = float(np.sqrt(2.0 / np.pi))


def gelu_numpy(x):
    """GELU, tanh approximation (as in GPT-2): 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
    _check_float_array("gelu", "x", x)
    t = np.tanh(_GELU_C * x * (1 + 0.044715 * (x * x)))  # x^3 as x * x * x: a float power is slow
    return 0.5 * x * (1 + t)


def gelu_backward_numpy(x, dy):
    """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)), t as in gelu."""
    _check_gelu_backward(x, dy)
    x2 = x * x
    t = np.tanh(_GELU_C * x * (1 + 0.044715 * x2))
    d_inner = _GELU_C * (1 + 3 * 0.044715 * x2)
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner)


def layer_norm_numpy(x, weight, bias=None, eps=1e-5):
    """Normalise the last axis, then scale and shift: returns (y, mean, rstd), the last two
    (..., 1) for the backward pass; rstd = 1 / sqrt(variance + eps)."""
    _check_layer_norm(x, weight, bias, eps)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    y = centered * rstd * weight
    return (y + bias if bias is not None else y), mean, rstd


def layer_norm_backward_numpy(x, weight, mean, rstd, dy, has_bias=True):
    """(dx, dweight, dbias or None) through layer_norm; mean and rstd are what it returned.
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with dxhat = dy * weight."""
    _check_layer_norm_backward(x, weight, mean, rstd, dy, has_bias)
    xhat = (x - mean) * rstd
    dxhat = dy * weight
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return dx, (dy * xhat).sum(axis=lead), (dy.sum(axis=lead) if has_bias else None)


def cross_entropy_numpy(logits, targets, ignore_index=-1, scale=1.0, want_grad=True):
    """Per-row loss and gradient of integer targets under softmax: logits (rows, V), targets (rows,).
    Returns (losses (rows,), dlogits (rows, V) or None): loss = logsumexp(z) - z[t] and
    dlogits = (softmax(z) - onehot(t)) * scale; both 0 on rows whose target is ignore_index."""
    _check_cross_entropy(logits, targets, ignore_index)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (rows, V)
    keep = targets != ignore_index
    rows = np.nonzero(keep)[0]
    losses = np.zeros(len(targets), logits.dtype)
    losses[rows] = -log_probs[rows, targets[rows]]
    if not want_grad:
        return losses, None
    dlogits = np.exp(log_probs)
    dlogits[rows, targets[rows]] -= 1
    dlogits[~keep] = 0
    return losses, dlogits * np.asarray(scale, logits.dtype)


def embedding_backward_numpy(ids, rows, n):
    """out (n, C) with out[i] = sum of rows[p] (P, C) over the positions p where ids[p] == i.

    What np.add.at(out, ids, rows) does, several times faster: sort the positions by id (stably,
    so each sum keeps the positions' order), then sum each run of equal ids in one reduceat."""
    _check_embedding_backward(ids, rows, n)
    out = np.zeros((n, rows.shape[1]), rows.dtype)
    if ids.size:
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])  # first position of each run
        out[sorted_ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out


def adamw_update_numpy(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps):
    """One AdamW update of param, m and v in place (see minqkv_adamw in csrc/minqkv.h):
    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p = p decay - step m / (sqrt(v) / bias2 + eps)."""
    _check_adamw(param, grad, m, v, bias2_sqrt)
    m *= beta1  # Python floats keep float32 arrays float32 (NumPy 2 promotion rules)
    m += (1.0 - beta1) * grad
    v *= beta2
    v += (1.0 - beta2) * grad * grad
    if decay_factor != 1.0:
        param *= decay_factor
    param -= step_size * (m / (np.sqrt(v) / bias2_sqrt + eps))


def attention_numpy(q, k, v, bias=None, scale=None):
    """Causal attention of q (B, H, T, hd) over k, v (B, Hkv, Tk, hd), fused: returns
    (y (B, H, T, hd), lse (B, H, T)), lse the log-sum-exp of each query's scores for the backward
    pass. Scores are scale * q k^T (+ bias (H, T, Tk)); query i sees keys j <= i + Tk - T; query
    head h reads key/value head h // (H // Hkv). scale defaults to 1 / sqrt(hd).
    y is stored token by token (see _in_token_order), as the C core writes it."""
    _check_attention("attention", q, k, v, bias)
    scores, visible = _attention_scores(q, k, bias, scale)  # (B, Hkv, G, T, Tk)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)  # initial: for Tk = 0
    lse = row_max + np.log(np.exp(scores - row_max).sum(axis=-1, keepdims=True))
    weights = np.where(visible, np.exp(scores - lse), 0)
    B, H, T, hd = q.shape
    y = weights @ v[:, :, None]  # (B, Hkv, G, T, Tk) @ (B, Hkv, 1, Tk, hd)
    return _in_token_order(y.reshape(B, H, T, hd)), lse.reshape(B, H, T)


def _attention_scores(q, k, bias, scale):
    """scale q k^T + bias with hidden keys at -inf, grouped (B, Hkv, G, T, Tk); and the mask."""
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(hd) if scale is None else scale
    grouped = q.reshape(B, Hkv, H // Hkv, T, hd)
    scores = (grouped @ np.swapaxes(k, -1, -2)[:, :, None]) * np.asarray(scale, q.dtype)
    if bias is not None:
        scores = scores + bias.reshape(Hkv, H // Hkv, T, Tk)
    visible = np.arange(Tk)[None, :] <= np.arange(T)[:, None] + (Tk - T)  # (T, Tk)
    return np.where(visible, scores, -np.inf).astype(q.dtype, copy=False), visible


def attention_backward_numpy(q, k, v, bias, y, lse, dy, scale=None, want_dbias=True):
    """(dq, dk, dv, dbias or None) through attention: with p = e^(s - lse) and
    ds = p (dy v^T - sum(dy * y)), dq = scale ds k, dk = scale ds^T q, dv = p^T dy,
    dbias = ds summed over the batch (and over nothing else)."""
    B, H, T, hd = q.shape
    _check_attention("attention_backward", q, k, v, bias,
                     (("y", y, q.shape), ("lse", lse, (B, H, T)), ("dy", dy, q.shape)))
    Hkv, Tk, G = k.shape[1], k.shape[2], H // k.shape[1]
    scale = 1.0 / np.sqrt(hd) if scale is None else scale
    scores, visible = _attention_scores(q, k, bias, scale)
    p = np.where(visible, np.exp(scores - lse.reshape(B, Hkv, G, T, 1)), 0)  # (B, Hkv, G, T, Tk)
    dy5 = dy.reshape(B, Hkv, G, T, hd)
    row_dot = (dy5 * y.reshape(B, Hkv, G, T, hd)).sum(axis=-1, keepdims=True)  # D_i
    ds = p * (dy5 @ np.swapaxes(v, -1, -2)[:, :, None] - row_dot)
    scale = np.asarray(scale, q.dtype)
    dq = (ds @ k[:, :, None]) * scale
    dk = (np.swapaxes(ds, -1, -2) @ q.reshape(B, Hkv, G, T, hd)).sum(axis=2) * scale
    dv = (np.swapaxes(p, -1, -2) @ dy5).sum(axis=2)
    dbias = ds.sum(axis=0).reshape(H, T, Tk) if bias is not None and want_dbias else None
    return _in_token_order(dq.reshape(q.shape)), _in_token_order(dk), _in_token_order(dv), dbias


def _in_token_order(x):
    """x (B, heads, T, hd) as a view of memory laid out (B, T, heads, hd), token by token, where
    both backends put the outputs of attention: transposing them back to (B, T, heads, hd) and
    merging the heads into (B, T, heads * hd), as the layer does next, then copies nothing."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


# ---- the C core ---------------------------------------------------------------------------


def _require_c(op, twin=None):
    if not HAVE_C:
        raise RuntimeError(f"{op}_c: the C core is not available (minqkv._ccore could not be imported: "
                           f"{_IMPORT_ERROR}). To get it, {_BUILD_HINT}; or use {twin or op + '_numpy'}.")


# The C functions of one dtype, and ctype, the cffi array type of its elements.
_KERNEL_NAMES = ("gemm", "gemm_workspace", "gemm_naive", "softmax", "softmax_backward", "gelu",
                 "gelu_backward", "layer_norm", "layer_norm_backward", "cross_entropy", "embedding_backward",
                 "adamw", "attention", "attention_backward")
_CKernels = collections.namedtuple("_CKernels", ("ctype",) + _KERNEL_NAMES)


@functools.cache
def _c_kernels(dtype):
    """The C functions for a checked float dtype: 'f' is float32, 'd' float64
    (minqkv_<name>_f32 or minqkv_<name>_f64, except the GEMM workspace: minqkv_gemm_workspace_f32)."""
    suffix, ctype = ("f32", "float[]") if dtype.char == "f" else ("f64", "double[]")
    return _CKernels(ctype, *(getattr(_lib, f"minqkv_{name}_{suffix}") for name in _KERNEL_NAMES))


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


def _pointer(ctype, x):
    """A C view of an array's memory, valid while the array lives."""
    return _ffi.from_buffer(ctype, x)


def gelu_c(x):
    """GELU on the C core; same contract as gelu."""
    _require_c("gelu")
    _check_float_array("gelu", "x", x)
    x = _contiguous(x)
    y = np.empty(x.shape, x.dtype)
    c = _c_kernels(x.dtype)
    _check_status("gelu", c.gelu(_pointer(c.ctype, x), _pointer(c.ctype, y), x.size, _num_threads))
    return y


def gelu_backward_c(x, dy):
    """The gradient through GELU on the C core; same contract as gelu_backward."""
    _require_c("gelu_backward")
    _check_gelu_backward(x, dy)
    x, dy = _contiguous(x), _contiguous(dy)
    dx = np.empty(x.shape, x.dtype)
    c = _c_kernels(x.dtype)
    status = c.gelu_backward(_pointer(c.ctype, x), _pointer(c.ctype, dy), _pointer(c.ctype, dx),
                             x.size, _num_threads)
    _check_status("gelu_backward", status)
    return dx


def layer_norm_c(x, weight, bias=None, eps=1e-5):
    """Layer norm on the C core; same contract as layer_norm."""
    _require_c("layer_norm")
    _check_layer_norm(x, weight, bias, eps)
    x, weight = _contiguous(x), _contiguous(weight)
    bias = _contiguous(bias) if bias is not None else None
    C = x.shape[-1]
    y = np.empty(x.shape, x.dtype)
    mean, rstd = np.empty(x.shape[:-1] + (1,), x.dtype), np.empty(x.shape[:-1] + (1,), x.dtype)
    c = _c_kernels(x.dtype)
    status = c.layer_norm(_pointer(c.ctype, x), _pointer(c.ctype, weight),
                          _pointer(c.ctype, bias) if bias is not None else _ffi.NULL,
                          _pointer(c.ctype, y), _pointer(c.ctype, mean), _pointer(c.ctype, rstd),
                          x.size // C, C, float(eps), _num_threads)
    _check_status("layer_norm", status)
    return y, mean, rstd


def layer_norm_backward_c(x, weight, mean, rstd, dy, has_bias=True):
    """The gradients through layer norm on the C core; same contract as layer_norm_backward."""
    _require_c("layer_norm_backward")
    _check_layer_norm_backward(x, weight, mean, rstd, dy, has_bias)
    x, weight, mean, rstd, dy = (_contiguous(a) for a in (x, weight, mean, rstd, dy))
    C = x.shape[-1]
    dx, dweight = np.empty(x.shape, x.dtype), np.empty(C, x.dtype)
    dbias = np.empty(C, x.dtype) if has_bias else None
    c = _c_kernels(x.dtype)
    status = c.layer_norm_backward(_pointer(c.ctype, x), _pointer(c.ctype, weight), _pointer(c.ctype, mean),
                                   _pointer(c.ctype, rstd), _pointer(c.ctype, dy), _pointer(c.ctype, dx),
                                   _pointer(c.ctype, dweight),
                                   _pointer(c.ctype, dbias) if has_bias else _ffi.NULL,
                                   x.size // C, C, _num_threads)
    _check_status("layer_norm_backward", status)
    return dx, dweight, dbias


def cross_entropy_c(logits, targets, ignore_index=-1, scale=1.0, want_grad=True):
    """Cross-entropy and its gradient on the C core; same contract as cross_entropy."""
    _require_c("cross_entropy")
    _check_cross_entropy(logits, targets, ignore_index)
    logits = _contiguous(logits)
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    rows, V = logits.shape
    losses = np.empty(rows, logits.dtype)
    dlogits = np.empty(logits.shape, logits.dtype) if want_grad else None
    c = _c_kernels(logits.dtype)
    status = c.cross_entropy(_pointer(c.ctype, logits), _pointer("int64_t[]", targets), int(ignore_index),
                             _pointer(c.ctype, losses),
                             _pointer(c.ctype, dlogits) if want_grad else _ffi.NULL,
                             float(scale), rows, V, _num_threads)
    _check_status("cross_entropy", status)
    return losses, dlogits


def embedding_backward_c(ids, rows, n):
    """The rows of a gradient summed by id on the C core; same contract as embedding_backward."""
    _require_c("embedding_backward")
    _check_embedding_backward(ids, rows, n)
    rows = _contiguous(rows)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty((n, rows.shape[1]), rows.dtype)
    c = _c_kernels(rows.dtype)
    status = c.embedding_backward(_pointer("int64_t[]", ids), _pointer(c.ctype, rows), _pointer(c.ctype, out),
                                  rows.shape[0], rows.shape[1], int(n))
    _check_status("embedding_backward", status)
    return out


def adamw_update_c(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps):
    """One AdamW update in place on the C core; same contract as adamw_update. Arrays that are
    not C-contiguous cannot be updated in place by C: they go to the NumPy twin."""
    _require_c("adamw_update")
    _check_adamw(param, grad, m, v, bias2_sqrt)
    if not all(a.flags.c_contiguous and a.flags.aligned for a in (param, m, v)):
        return adamw_update_numpy(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps)
    grad = _contiguous(grad)
    c = _c_kernels(param.dtype)
    status = c.adamw(_pointer(c.ctype, param), _pointer(c.ctype, grad), _pointer(c.ctype, m),
                     _pointer(c.ctype, v), param.size, float(beta1), float(beta2), float(decay_factor),
                     float(step_size), float(bias2_sqrt), float(eps), _num_threads)
    _check_status("adamw_update", status)


# From this many queries on, the arrays a kernel reads again for every block of the other side
# (the forward pass: k and v, once per block of queries; the backward: q, dy and y, once per block
# of keys) are first copied head by head: rows that lie far apart (a head's rows in a (B, T, 3C)
# projection are 3C apart) then cost more than the copy. Measured on one thread, 4 heads of 32,
# forward/backward with the copies against without: T = 4096, 123/160 ms against 140/191;
# T = 2048, 29/40 against 28/42; at T = 512 and below the copies only cost (T = 128, B = 32:
# 7.6/12.7 against 6.5/11.9). Decoding (one query at a time) never copies its cache.
LONG_QUERIES = 4096


def _heads(x, copy=False):
    """An array x (B, heads, rows, hd) for the attention kernels, which read it where it lies:
    (array, layout), layout its strides (batch, head, row) in elements (a minqkv_heads_layout).

    The kernels need the head dimension contiguous, strides that are whole non-negative numbers
    of elements and an aligned start; the heads of a projection (B, T, H * hd), seen as
    (B, H, T, hd), are such a view, and so is a C-contiguous array. Anything else is copied, and
    with copy=True so is anything not C-contiguous (see LONG_QUERIES). (A NumPy array's strides
    keep every element inside its buffer, so these are in bounds.)"""
    item = x.itemsize
    usable = x.flags.aligned and (x.shape[3] <= 1 or x.strides[3] == item) and all(
        n <= 1 or (stride >= 0 and stride % item == 0) for n, stride in zip(x.shape[:3], x.strides[:3]))
    if not usable or (copy and not x.flags.c_contiguous):
        x = np.array(x, order="C", copy=True)
    return x, tuple(stride // item if n > 1 else 0 for n, stride in zip(x.shape[:3], x.strides[:3]))


def _empty_in_token_order(shape, dtype):
    """A new array of shape (B, heads, T, hd) laid out (B, T, heads, hd), as _in_token_order says."""
    B, heads, T, hd = shape
    return np.empty((B, T, heads, hd), dtype).transpose(0, 2, 1, 3)


def _address(ctype, x):
    """A C pointer to x's first element, for arrays that are views with gaps (which cffi's
    from_buffer refuses); valid while x lives."""
    return _ffi.cast(ctype.replace("[]", " *"), x.ctypes.data)


def attention_c(q, k, v, bias=None, scale=None):
    """Fused causal attention on the C core; same contract as attention. q, k and v are read
    where they lie (see _heads; k and v are copied head by head for LONG_QUERIES queries or more);
    y is written token by token (see _in_token_order)."""
    _require_c("attention")
    _check_attention("attention", q, k, v, bias)
    long = q.shape[2] >= LONG_QUERIES
    (q, q_layout), (k, k_layout), (v, v_layout) = _heads(q), _heads(k, copy=long), _heads(v, copy=long)
    bias = _contiguous(bias) if bias is not None else None
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    y, lse = _empty_in_token_order(q.shape, q.dtype), np.empty((B, H, T), q.dtype)
    y_layout = _heads(y)[1]
    c = _c_kernels(q.dtype)
    A = functools.partial(_address, c.ctype)
    status = c.attention(A(q), q_layout, A(k), k_layout, A(v), v_layout,
                         _pointer(c.ctype, bias) if bias is not None else _ffi.NULL,
                         A(y), y_layout, _pointer(c.ctype, lse), B, H, Hkv, T, Tk, hd,
                         float(1.0 / np.sqrt(hd) if scale is None else scale), _num_threads)
    _check_status("attention", status)
    return y, lse


def attention_backward_c(q, k, v, bias, y, lse, dy, scale=None, want_dbias=True):
    """The gradients through fused causal attention on the C core; same contract as
    attention_backward. q, k, v, y and dy are read where they lie (see _heads; q, y and dy are
    copied head by head for LONG_QUERIES queries or more); dq, dk and dv are new arrays written
    token by token (see _in_token_order), so they overlap no input."""
    _require_c("attention_backward")
    B, H, T, hd = q.shape
    _check_attention("attention_backward", q, k, v, bias,
                     (("y", y, q.shape), ("lse", lse, (B, H, T)), ("dy", dy, q.shape)))
    long = T >= LONG_QUERIES
    (k, k_layout), (v, v_layout) = _heads(k), _heads(v)
    (q, q_layout), (y, y_layout), (dy, dy_layout) = (_heads(x, copy=long) for x in (q, y, dy))
    lse = _contiguous(lse)
    bias = _contiguous(bias) if bias is not None else None
    Hkv, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = (_empty_in_token_order(shape, q.dtype) for shape in (q.shape, k.shape, v.shape))
    dq_layout, dk_layout, dv_layout = _heads(dq)[1], _heads(dk)[1], _heads(dv)[1]
    dbias = np.empty(bias.shape, q.dtype) if bias is not None and want_dbias else None
    c = _c_kernels(q.dtype)
    A = functools.partial(_address, c.ctype)
    P = lambda a: _pointer(c.ctype, a) if a is not None else _ffi.NULL  # noqa: E731
    status = c.attention_backward(A(q), q_layout, A(k), k_layout, A(v), v_layout, P(bias), A(y), y_layout,
                                  P(lse), A(dy), dy_layout, A(dq), dq_layout, A(dk), dk_layout, A(dv),
                                  dv_layout, P(dbias), B, H, Hkv, T, Tk, hd,
                                  float(1.0 / np.sqrt(hd) if scale is None else scale), _num_threads)
    _check_status("attention_backward", status)
    return dq, dk, dv, dbias


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


def gelu(x):
    """GELU, tanh approximation (as in GPT-2), elementwise; returns a new array."""
    return gelu_c(x) if _backend == "c" else gelu_numpy(x)


def gelu_backward(x, dy):
    """The gradient through y = gelu(x): dx = dy * gelu'(x)."""
    return gelu_backward_c(x, dy) if _backend == "c" else gelu_backward_numpy(x, dy)


def layer_norm(x, weight, bias=None, eps=1e-5):
    """Layer norm over the last axis of x (..., C) with weight and bias (C,) (bias may be None);
    returns (y, mean, rstd) with mean and rstd of shape (..., 1) for layer_norm_backward."""
    if _backend == "c":
        return layer_norm_c(x, weight, bias, eps)
    return layer_norm_numpy(x, weight, bias, eps)


def layer_norm_backward(x, weight, mean, rstd, dy, has_bias=True):
    """(dx, dweight, dbias) through layer_norm (dbias None when has_bias is false)."""
    if _backend == "c":
        return layer_norm_backward_c(x, weight, mean, rstd, dy, has_bias)
    return layer_norm_backward_numpy(x, weight, mean, rstd, dy, has_bias)


def cross_entropy(logits, targets, ignore_index=-1, scale=1.0, want_grad=True):
    """Per-row loss of integer targets (rows,) under softmax(logits (rows, V)), and its gradient
    (softmax - onehot) * scale unless want_grad is false: (losses, dlogits or None). Rows whose
    target is ignore_index give 0 loss and 0 gradient."""
    if _backend == "c":
        return cross_entropy_c(logits, targets, ignore_index, scale, want_grad)
    return cross_entropy_numpy(logits, targets, ignore_index, scale, want_grad)


def embedding_backward(ids, rows, n):
    """The gradient of an embedding table (n, C) whose rows ids (P,) were picked: out (n, C), each
    row the sum of rows (P, C) over the positions that picked it, added in position order."""
    if _backend == "c":
        return embedding_backward_c(ids, rows, n)
    return embedding_backward_numpy(ids, rows, n)


def adamw_update(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps):
    """One AdamW update of param, m and v in place; see minqkv_adamw in csrc/minqkv.h."""
    if _backend == "c":
        return adamw_update_c(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps)
    return adamw_update_numpy(param, grad, m, v, beta1, beta2, decay_factor, step_size, bias2_sqrt, eps)


def attention(q, k, v, bias=None, scale=None):
    """Causal attention, fused (no (T, Tk) matrix kept): q (B, H, T, hd), k and v (B, Hkv, Tk, hd),
    bias (H, T, Tk) or None -> (y (B, H, T, hd), lse (B, H, T)) for attention_backward.

    q, k and v may be strided views, such as the heads of one (B, T, 3C) projection split three
    ways and seen as (B, H, T, hd): the C core reads them where they lie. y is stored token by
    token, (B, T, H, hd) in memory, so that merging its heads into (B, T, H * hd) costs no copy."""
    return attention_c(q, k, v, bias, scale) if _backend == "c" else attention_numpy(q, k, v, bias, scale)


def attention_backward(q, k, v, bias, y, lse, dy, scale=None, want_dbias=True):
    """(dq, dk, dv, dbias or None) through attention, recomputing the scores from lse. Inputs may
    be strided views as in attention; dq, dk and dv are new arrays stored token by token."""
    if _backend == "c":
        return attention_backward_c(q, k, v, bias, y, lse, dy, scale, want_dbias)
    return attention_backward_numpy(q, k, v, bias, y, lse, dy, scale, want_dbias)
