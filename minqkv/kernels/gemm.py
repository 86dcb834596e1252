"""matmul: op(a) @ op(b) for a pair of matrices or a batch of them, three ways.

  matmul_numpy     NumPy's matmul (OpenBLAS): the reference
  matmul_c         the C core's blocked GEMM (csrc/gemm.c, csrc/gemm_template.h)
  matmul_naive_c   the C core's three plain loops, the readable version of the blocked one: same
                   numbers up to rounding, much slower; nothing calls it but tests and lessons
"""

import numpy as np

from . import runtime
from .runtime import check_float_array, check_same_dtype, pointer


def _matmul_sizes(a, b, trans_a, trans_b, op="matmul"):
    """Check the arguments of matmul (or of op, a variant of it); return (batch or None, M, N, K)."""
    check_float_array(op, "a", a)
    check_float_array(op, "b", b)
    check_same_dtype(op, "a", a, "b", b)
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
    if (batch or 1) * M * N > runtime.MAX_ELEMENTS:
        raise ValueError(f"{op}: a has shape {a.shape} and b has shape {b.shape}; the product would "
                         f"have {(batch or 1) * M * N} elements, more than minqkv can address")
    return batch, M, N, K


def matmul_numpy(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b): a, b both 2-D (M, K) @ (K, N) or both 3-D (batch, M, K) @ (batch, K, N),
    with op(x) = x, or its last two axes swapped when trans_x is true. Same float dtype in and
    out; returns a new C-contiguous array."""
    _matmul_sizes(a, b, trans_a, trans_b)
    op_a = np.swapaxes(a, -1, -2) if trans_a else a
    op_b = np.swapaxes(b, -1, -2) if trans_b else b
    return np.ascontiguousarray(np.matmul(op_a, op_b))


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
    runtime.require_c(op, twin="matmul_numpy")
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
    operands = (trans_a, trans_b, batch, M, N, K, pointer(a3), a3.shape[2], stride_a,
                pointer(b3), b3.shape[2], stride_b, pointer(out), N, M * N)
    if naive:
        status = runtime.c_function("gemm_naive", a.dtype)(*operands)
    else:
        # read once: the workspace must be sized for the very count C is given, even if
        # another Python thread calls set_num_threads meanwhile
        num_threads = runtime.get_num_threads()
        workspace = np.empty(runtime.c_function("gemm_workspace", a.dtype)(batch, M, N, K, num_threads), a.dtype)
        status = runtime.c_function("gemm", a.dtype)(*operands, pointer(workspace), workspace.size, num_threads)
    runtime.check_status(op, status)
    return out


def matmul_c(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) on the C core's fast GEMM; same contract as matmul_numpy."""
    return _gemm_c("matmul", a, b, trans_a, trans_b, naive=False)


def matmul_naive_c(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) on the C core's naive three-loop GEMM, the readable reference for the fast
    one (minqkv_gemm_naive_f32/_f64); same contract as matmul_numpy, on one thread, slow."""
    return _gemm_c("matmul_naive", a, b, trans_a, trans_b, naive=True)
