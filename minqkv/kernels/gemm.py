"""matmul: op(a) @ op(b) for a pair of matrices or a batch of them, three ways; optionally plus a
bias on every row (a Linear layer's), or added into an existing array (add_to: a gradient summed
over several products without a temporary for each).

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


def _check_bias_and_add_to(op, a, b, bias, add_to, out_shape):
    """bias: None or (N,) of a's dtype; add_to: None or a writable C-contiguous array of the
    product's shape and a's dtype (the product is added into it, in place)."""
    if bias is not None:
        check_float_array(op, "bias", bias)
        check_same_dtype(op, "a", a, "bias", bias)
        if bias.shape != out_shape[-1:]:
            raise ValueError(f"{op}: bias has shape {bias.shape}, expected ({out_shape[-1]},): one "
                             "value per column of the product")
    if add_to is not None:
        check_float_array(op, "add_to", add_to)
        check_same_dtype(op, "a", a, "add_to", add_to)
        if add_to.shape != out_shape:
            raise ValueError(f"{op}: add_to has shape {add_to.shape}, expected the product's {out_shape}")
        if not (add_to.flags.c_contiguous and add_to.flags.writeable):
            raise ValueError(f"{op}: add_to must be a writable C-contiguous array (the product is added "
                             "into it in place)")
        if np.may_share_memory(add_to, a) or np.may_share_memory(add_to, b):
            raise ValueError(f"{op}: add_to shares memory with a or b; the product would read what it writes")


def _product_shape(batch, M, N):
    return (M, N) if batch is None else (batch, M, N)


def matmul_numpy(a, b, trans_a=False, trans_b=False, bias=None, add_to=None):
    """op(a) @ op(b) [+ bias]: a, b both 2-D (M, K) @ (K, N) or both 3-D (batch, M, K) @ (batch,
    K, N), with op(x) = x, or its last two axes swapped when trans_x is true; bias (N,) is added
    to every row. Same float dtype in and out. Returns a new C-contiguous array, or, given add_to
    (an array of the product's shape), adds the result into add_to and returns it."""
    batch, M, N, _ = _matmul_sizes(a, b, trans_a, trans_b)
    _check_bias_and_add_to("matmul", a, b, bias, add_to, _product_shape(batch, M, N))
    op_a = np.swapaxes(a, -1, -2) if trans_a else a
    op_b = np.swapaxes(b, -1, -2) if trans_b else b
    out = np.ascontiguousarray(np.matmul(op_a, op_b))
    if bias is not None:
        out += bias
    if add_to is not None:
        add_to += out
        return add_to
    return out


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


def _gemm_c(op, a, b, trans_a, trans_b, bias, add_to, naive):
    """The body of matmul_c and matmul_naive_c: check, hand the operands over, call C."""
    runtime.require_c(op, twin="matmul_numpy")
    trans_a, trans_b = bool(trans_a), bool(trans_b)
    batch, M, N, K = _matmul_sizes(a, b, trans_a, trans_b, op)
    _check_bias_and_add_to(op, a, b, bias, add_to, _product_shape(batch, M, N))
    stacked = batch is not None
    batch = batch if stacked else 1
    out = np.empty((batch, M, N) if stacked else (M, N), a.dtype) if add_to is None else add_to
    if out.size == 0:
        return out
    bias = None if bias is None else runtime.contiguous(bias)
    bias_pointer = runtime.ffi.NULL if bias is None else pointer(bias)
    a3, trans_a, stride_a = _matrix_operand(a if stacked else a[None], trans_a)
    b3, trans_b, stride_b = _matrix_operand(b if stacked else b[None], trans_b)
    operands = (trans_a, trans_b, batch, M, N, K, pointer(a3), a3.shape[2], stride_a,
                pointer(b3), b3.shape[2], stride_b, pointer(out), N, M * N, bias_pointer, add_to is not None)
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


def matmul_c(a, b, trans_a=False, trans_b=False, bias=None, add_to=None):
    """op(a) @ op(b) [+ bias] on the C core's fast GEMM; same contract as matmul_numpy. The bias
    is added as each tile of the product is stored, and add_to is accumulated into in place: no
    second pass over the product either way."""
    return _gemm_c("matmul", a, b, trans_a, trans_b, bias, add_to, naive=False)


def matmul_naive_c(a, b, trans_a=False, trans_b=False, bias=None, add_to=None):
    """op(a) @ op(b) [+ bias] on the C core's naive three-loop GEMM, the readable reference for the
    fast one (minqkv_gemm_naive_f32/_f64); same contract as matmul_numpy, on one thread, slow."""
    return _gemm_c("matmul_naive", a, b, trans_a, trans_b, bias, add_to, naive=True)
