"""softmax over the last axis (optionally causal) and its backward pass, each as a NumPy reference
beside its binding to the C core (csrc/softmax.c, csrc/softmax_template.h)."""

import numpy as np

from . import runtime
from .runtime import check_float_array, check_same_dtype, pointer


def _check_softmax(x, causal):
    check_float_array("softmax", "x", x)
    if x.ndim < 1:
        raise ValueError("softmax: x must have at least 1 dimension, got a 0-d array")
    if causal and x.ndim < 2:
        raise ValueError(f"softmax: causal=True needs x with at least 2 dimensions (..., Tq, Tk), "
                         f"got shape {x.shape}")


def softmax_numpy(x, causal=False):
    """Softmax over the last axis of x (float32/float64, ndim >= 1); returns a new array.

    causal=True treats the last two axes as (Tq, Tk) and lets query i see key j only when
    j <= i + (Tk - Tq), so the last query sees every key (decoding with a KV cache). A row with
    nothing to see, or only -inf, gives zeros; a row holding NaN gives NaN."""
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


def softmax_c(x, causal=False):
    """Softmax over the last axis on the C core; same contract as softmax_numpy."""
    runtime.require_c("softmax")
    _check_softmax(x, causal)
    out = np.empty(x.shape, x.dtype)
    if x.size == 0:
        return out
    x = runtime.contiguous(x)
    Tk = x.shape[-1]
    Tq = x.shape[-2] if causal else 1
    batch = x.size // (Tq * Tk)
    status = runtime.c_function("softmax", x.dtype)(pointer(x), pointer(out), batch, Tq, Tk, bool(causal),
                                                    runtime.get_num_threads())
    runtime.check_status("softmax", status)
    return out


def _check_softmax_backward(y, dy):
    check_float_array("softmax_backward", "y", y)
    check_float_array("softmax_backward", "dy", dy)
    check_same_dtype("softmax_backward", "y", y, "dy", dy)
    if y.shape != dy.shape:
        raise ValueError(f"softmax_backward: y has shape {y.shape} but dy has shape {dy.shape}; "
                         "they must be the same")
    if y.ndim < 1:
        raise ValueError("softmax_backward: y and dy must have at least 1 dimension, got 0-d arrays")


def softmax_backward_numpy(y, dy):
    """The gradient through y = softmax(x): dx = y * (dy - sum(dy * y)) over the last axis."""
    _check_softmax_backward(y, dy)
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def softmax_backward_c(y, dy):
    """dx = y * (dy - sum(dy * y)) on the C core; same contract as softmax_backward_numpy."""
    runtime.require_c("softmax_backward")
    _check_softmax_backward(y, dy)
    dx = np.empty(y.shape, y.dtype)
    if y.size == 0:
        return dx
    y, dy = runtime.contiguous(y), runtime.contiguous(dy)
    n = y.shape[-1]
    status = runtime.c_function("softmax_backward", y.dtype)(pointer(y), pointer(dy), pointer(dx), y.size // n, n,
                                                             runtime.get_num_threads())
    runtime.check_status("softmax_backward", status)
    return dx
