"""The layers of the GPT around its products, forward and backward, each as a NumPy reference
beside its binding to the C core (csrc/layers.c, csrc/layers_template.h):
GELU, the sum of two arrays, layer norm, column sums (a bias gradient), cross-entropy (loss and
gradient in one pass) and an embedding's backward pass.
"""

import numpy as np

from . import runtime
from .runtime import check_float_array, check_same_dtype, check_same_shape, pointer

# ---- GELU ------------------------------------------------------------------------------------

_GELU_C = float(np.sqrt(2.0 / np.pi))


def gelu_numpy(x):
    """GELU, tanh approximation (as in GPT-2), elementwise: 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
    with c = sqrt(2 / pi); returns a new array."""
    check_float_array("gelu", "x", x)
    t = np.tanh(_GELU_C * x * (1 + 0.044715 * (x * x)))  # x^3 as x * x * x: a float power is slow
    return 0.5 * x * (1 + t)


def gelu_c(x):
    """GELU on the C core; same contract as gelu_numpy."""
    runtime.require_c("gelu")
    check_float_array("gelu", "x", x)
    x = runtime.contiguous(x)
    y = np.empty(x.shape, x.dtype)
    status = runtime.c_function("gelu", x.dtype)(pointer(x), pointer(y), x.size, runtime.get_num_threads())
    runtime.check_status("gelu", status)
    return y


# ---- the sum of two arrays: the residual stream, and gradients that meet --------------------


def _check_add(a, b):
    for name, array in (("a", a), ("b", b)):
        check_float_array("add", name, array)
    check_same_dtype("add", "a", a, "b", b)
    check_same_shape("add", "a", a, "b", b)


def add_numpy(a, b):
    """a + b for two float arrays of one shape and dtype; returns a new array."""
    _check_add(a, b)
    return a + b


def add_c(a, b):
    """a + b on the C core, shared between threads (NumPy's runs on one); same contract as add_numpy."""
    runtime.require_c("add")
    _check_add(a, b)
    a, b = runtime.contiguous(a), runtime.contiguous(b)
    out = np.empty(a.shape, a.dtype)
    status = runtime.c_function("add", a.dtype)(pointer(a), pointer(b), pointer(out), a.size, runtime.get_num_threads())
    runtime.check_status("add", status)
    return out


def _check_gelu_backward(x, dy):
    for name, array in (("x", x), ("dy", dy)):
        check_float_array("gelu_backward", name, array)
    check_same_dtype("gelu_backward", "x", x, "dy", dy)
    check_same_shape("gelu_backward", "x", x, "dy", dy)


def gelu_backward_numpy(x, dy):
    """The gradient through y = gelu(x): dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)),
    t as in gelu."""
    _check_gelu_backward(x, dy)
    x2 = x * x
    t = np.tanh(_GELU_C * x * (1 + 0.044715 * x2))
    d_inner = _GELU_C * (1 + 3 * 0.044715 * x2)
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner)


def gelu_backward_c(x, dy):
    """The gradient through GELU on the C core; same contract as gelu_backward_numpy."""
    runtime.require_c("gelu_backward")
    _check_gelu_backward(x, dy)
    x, dy = runtime.contiguous(x), runtime.contiguous(dy)
    dx = np.empty(x.shape, x.dtype)
    status = runtime.c_function("gelu_backward", x.dtype)(pointer(x), pointer(dy), pointer(dx), x.size,
                                                          runtime.get_num_threads())
    runtime.check_status("gelu_backward", status)
    return dx


# ---- layer norm ------------------------------------------------------------------------------


def _check_layer_norm(x, weight, bias):
    check_float_array("layer_norm", "x", x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x must have a last axis of at least 1 element, got shape {x.shape}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None and name == "bias":
            continue
        check_float_array("layer_norm", name, param)
        check_same_dtype("layer_norm", "x", x, name, param)
        if param.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm: {name} has shape {param.shape} but x {x.shape} needs "
                             f"({x.shape[-1]},)")


def layer_norm_numpy(x, weight, bias=None, eps=1e-5):
    """Layer norm over the last axis of x (..., C) with weight and bias (C,) (bias may be None):
    normalise, then scale and shift. Returns (y, mean, rstd), mean and rstd of shape (..., 1) for
    layer_norm_backward, rstd = 1 / sqrt(variance + eps)."""
    _check_layer_norm(x, weight, bias)
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    y = centered * rstd * weight
    return (y + bias if bias is not None else y), mean, rstd


def layer_norm_c(x, weight, bias=None, eps=1e-5):
    """Layer norm on the C core; same contract as layer_norm_numpy."""
    runtime.require_c("layer_norm")
    _check_layer_norm(x, weight, bias)
    x, weight = runtime.contiguous(x), runtime.contiguous(weight)
    bias = runtime.contiguous(bias) if bias is not None else None
    C = x.shape[-1]
    y = np.empty(x.shape, x.dtype)
    mean, rstd = np.empty(x.shape[:-1] + (1,), x.dtype), np.empty(x.shape[:-1] + (1,), x.dtype)
    status = runtime.c_function("layer_norm", x.dtype)(pointer(x), pointer(weight), pointer(bias), pointer(y),
                                                       pointer(mean), pointer(rstd), x.size // C, C, float(eps),
                                                       runtime.get_num_threads())
    runtime.check_status("layer_norm", status)
    return y, mean, rstd


def _check_layer_norm_backward(x, weight, mean, rstd, dy):
    _check_layer_norm(x, weight, None)
    for name, array in (("mean", mean), ("rstd", rstd), ("dy", dy)):
        check_float_array("layer_norm_backward", name, array)
        check_same_dtype("layer_norm_backward", "x", x, name, array)
    check_same_shape("layer_norm_backward", "x", x, "dy", dy)
    for name, array in (("mean", mean), ("rstd", rstd)):
        if array.shape != x.shape[:-1] + (1,):
            raise ValueError(f"layer_norm_backward: {name} has shape {array.shape} but x {x.shape} "
                             f"needs {x.shape[:-1] + (1,)} (as layer_norm returns it)")


def layer_norm_backward_numpy(x, weight, mean, rstd, dy, has_bias=True):
    """(dx, dweight, dbias or None) through layer_norm; mean and rstd are what it returned.
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with dxhat = dy * weight."""
    _check_layer_norm_backward(x, weight, mean, rstd, dy)
    xhat = (x - mean) * rstd
    dxhat = dy * weight
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return dx, (dy * xhat).sum(axis=lead), (dy.sum(axis=lead) if has_bias else None)


def layer_norm_backward_c(x, weight, mean, rstd, dy, has_bias=True):
    """The gradients through layer norm on the C core; same contract as layer_norm_backward_numpy."""
    runtime.require_c("layer_norm_backward")
    _check_layer_norm_backward(x, weight, mean, rstd, dy)
    x, weight, mean, rstd, dy = (runtime.contiguous(a) for a in (x, weight, mean, rstd, dy))
    C = x.shape[-1]
    rows = x.size // C
    dx, dweight = np.empty(x.shape, x.dtype), np.empty(C, x.dtype)
    dbias = np.empty(C, x.dtype) if has_bias else None
    workspace = np.empty(2 * C * runtime.lib.minqkv_row_chunks(rows), x.dtype)  # each chunk's column sums
    status = runtime.c_function("layer_norm_backward", x.dtype)(
        pointer(x), pointer(weight), pointer(mean), pointer(rstd), pointer(dy), pointer(dx), pointer(dweight),
        pointer(dbias), pointer(workspace), rows, C, runtime.get_num_threads())
    runtime.check_status("layer_norm_backward", status)
    return dx, dweight, dbias


# ---- column sums: a Linear's bias gradient ------------------------------------------------------


def _check_column_sums(x):
    check_float_array("column_sums", "x", x)
    if x.ndim != 2:
        raise ValueError(f"column_sums: x must be 2-D (rows, cols), got shape {x.shape}")


def column_sums_numpy(x):
    """The sum of x's rows: x (rows, cols) -> (cols,), as a Linear's bias gradient is its output
    gradient summed over every position."""
    _check_column_sums(x)
    return x.sum(axis=0)


def column_sums_c(x):
    """The sum of x's rows on the C core; same contract as column_sums_numpy. Threads share chunks
    of rows (NumPy's sum runs on one), and the result has the same bits on any thread count."""
    runtime.require_c("column_sums")
    _check_column_sums(x)
    x = runtime.contiguous(x)
    rows, cols = x.shape
    out = np.empty(cols, x.dtype)
    workspace = np.empty(cols * runtime.lib.minqkv_row_chunks(rows), x.dtype)  # each chunk's sums
    status = runtime.c_function("column_sums", x.dtype)(pointer(x), rows, cols, pointer(out), pointer(workspace),
                                                        runtime.get_num_threads())
    runtime.check_status("column_sums", status)
    return out


# ---- cross-entropy and the embedding's backward pass: rows picked by integer ids ----------------


def _check_rows_and_ids(op, rows_name, rows, ids_name, ids):
    """rows: a float array (P, width) with width >= 1; ids: integers (P,), one for each row."""
    check_float_array(op, rows_name, rows)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"{op}: {rows_name} must be 2-D with at least one column, got shape {rows.shape}")
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise TypeError(f"{op}: {ids_name} must be a numpy array of integers")
    if ids.shape != rows.shape[:1]:
        raise ValueError(f"{op}: {ids_name} have shape {ids.shape} but {rows_name} {rows.shape} "
                         f"need ({rows.shape[0]},)")


def cross_entropy_numpy(logits, targets, ignore_index=-1, scale=1.0, want_grad=True):
    """Per-row loss of integer targets (rows,) under softmax(logits (rows, V)), and its gradient
    unless want_grad is false: (losses (rows,), dlogits (rows, V) or None), with
    loss = logsumexp(z) - z[t] and dlogits = (softmax(z) - onehot(t)) * scale; both 0 on rows whose
    target is ignore_index. Every other target must lie in [0, V) (the caller checks)."""
    _check_rows_and_ids("cross_entropy", "logits", logits, "targets", targets)
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


def cross_entropy_c(logits, targets, ignore_index=-1, scale=1.0, want_grad=True):
    """Cross-entropy and its gradient on the C core; same contract as cross_entropy_numpy
    (C refuses a target outside [0, V) that is not ignore_index)."""
    runtime.require_c("cross_entropy")
    _check_rows_and_ids("cross_entropy", "logits", logits, "targets", targets)
    logits = runtime.contiguous(logits)
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    rows, V = logits.shape
    losses = np.empty(rows, logits.dtype)
    dlogits = np.empty(logits.shape, logits.dtype) if want_grad else None
    status = runtime.c_function("cross_entropy", logits.dtype)(
        pointer(logits), pointer(targets), int(ignore_index), pointer(losses), pointer(dlogits), float(scale),
        rows, V, runtime.get_num_threads())
    runtime.check_status("cross_entropy", status)
    return losses, dlogits


def _check_embedding_backward(ids, rows, n):
    _check_rows_and_ids("embedding_backward", "rows", rows, "ids", ids)
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"embedding_backward: n (the rows of the table) must be an integer >= 0, got {n!r}")


def embedding_backward_numpy(ids, rows, n):
    """The gradient of an embedding table (n, C) whose rows ids (P,) were picked: out (n, C), each
    row the sum of rows (P, C) over the positions that picked it, added in position order. Every
    id must lie in [0, n) (the caller checks).

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


def embedding_backward_c(ids, rows, n):
    """The rows of a gradient summed by id on the C core; same contract as embedding_backward_numpy
    (C refuses an id outside [0, n))."""
    runtime.require_c("embedding_backward")
    _check_embedding_backward(ids, rows, n)
    rows = runtime.contiguous(rows)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty((n, rows.shape[1]), rows.dtype)
    status = runtime.c_function("embedding_backward", rows.dtype)(pointer(ids), pointer(rows), pointer(out),
                                                                  rows.shape[0], rows.shape[1], int(n))
    runtime.check_status("embedding_backward", status)
    return out
