"""Causal attention, fused: no (T, Tk) matrix is kept between the passes, only one number per
query (the log of its softmax denominator, lse), from which the backward pass recomputes the
scores. With window=W (W >= 1) it is a causal sliding window: each query sees only the last W keys
up to its own position (Longformer, Mistral), and the C core skips the key blocks outside every
window, so its cost grows as T * W rather than T^2. Each pass as a NumPy reference beside its
binding to the C core (csrc/attention.c, csrc/attention_template.h), and attention_naive_c, the
C core's row-by-row reference.

Layouts: q, k and v may be strided views, such as the heads of one (B, T, 3C) projection split
three ways and seen as (B, H, T, hd); the C core reads them where they lie. y and the gradients
dq, dk, dv are new arrays stored token by token, (B, T, heads, hd) in memory, so that merging
their heads into (B, T, heads * hd), as the layer does next, copies nothing (_in_token_order).
"""

import operator

import numpy as np

from . import runtime
from .runtime import check_float_array, check_same_dtype, pointer


def _check_window(op, window):
    """The window as an int: 0 (or None) for every earlier key, W >= 1 for the last W keys."""
    if window is None:
        return 0
    if isinstance(window, bool):
        raise TypeError(f"{op}: window must be a whole number of keys (0 for no window), got {window!r}")
    try:
        window = operator.index(window)  # ints and NumPy integers; floats are refused
    except TypeError:
        raise TypeError(f"{op}: window must be a whole number of keys (0 for no window), got "
                        f"{type(window).__name__} {window!r}") from None
    if window < 0:
        raise ValueError(f"{op}: window must be >= 0 keys (0 for no window), got {window}")
    return window


def _check_attention(op, q, k, v, bias, saved=(), window=0):
    """q (B, H, T, hd), k and v (B, Hkv, Tk, hd), bias (H, T, Tk) or None; saved: the backward
    pass's (y, lse, dy), which must be (B, H, T, hd), (B, H, T) and (B, H, T, hd), q's dtype.
    Returns the window as an int (see _check_window)."""
    named_saved = tuple(zip(("y", "lse", "dy"), saved))
    for name, array in (("q", q), ("k", k), ("v", v)) + named_saved:
        check_float_array(op, name, array)
        check_same_dtype(op, "q", q, name, array)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{op}: q, k and v must be 4-D (B, heads, T, hd), got shapes {q.shape}, "
                         f"{k.shape}, {v.shape}")
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != hd:
        raise ValueError(f"{op}: k {k.shape} and v {v.shape} must both be (B={B}, Hkv, Tk, hd={hd}) "
                         f"for q {q.shape}")
    if (Hkv == 0 and H > 0) or (Hkv > 0 and H % Hkv):  # no heads at all (H = Hkv = 0) is an empty result
        raise ValueError(f"{op}: q has {H} heads but k and v have {Hkv}; the key/value heads must "
                         "divide the query heads (grouped-query attention)")
    if Tk < T or hd == 0:
        raise ValueError(f"{op}: k and v have Tk={Tk} positions for T={T} queries and head width "
                         f"{hd}; causal attention needs Tk >= T and hd >= 1")
    if bias is not None:
        check_float_array(op, "bias", bias)
        check_same_dtype(op, "q", q, "bias", bias)
        if bias.shape != (H, T, Tk):
            raise ValueError(f"{op}: bias has shape {bias.shape} but must be (H, T, Tk) = {(H, T, Tk)}")
    for name, array in named_saved:
        shape = (B, H, T) if name == "lse" else q.shape
        if array.shape != shape:
            raise ValueError(f"{op}: {name} has shape {array.shape} but must be {shape}")
    return _check_window(op, window)


def _in_token_order(x):
    """x (B, heads, T, hd) as a view of memory laid out (B, T, heads, hd), token by token, where
    both backends put the outputs of attention: transposing them back to (B, T, heads, hd) and
    merging the heads into (B, T, heads * hd), as the layer does next, then copies nothing."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def _first_seen_key(T, Tk, window):
    """The first key any query sees: keys before it lie outside every window (only with a
    window and Tk > T, a decoding cache longer than the window)."""
    return max(0, Tk - T - window + 1) if window else 0


def _visible(T, Tk, window):
    """(T, Tk) mask: query i sees key j iff i + (Tk - T) - window < j <= i + (Tk - T)."""
    ahead = np.arange(Tk)[None, :] - (np.arange(T)[:, None] + (Tk - T))  # j minus the query's position
    return (ahead <= 0) & (ahead > -window) if window else ahead <= 0


def _attention_scores(q, k, bias, scale, window):
    """scale q k^T + bias with hidden keys at -inf, grouped (B, Hkv, G, T, Tk); and the mask."""
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(hd) if scale is None else scale
    G = H // Hkv if Hkv else 0  # query heads per key/value head
    grouped = q.reshape(B, Hkv, G, T, hd)
    scores = (grouped @ np.swapaxes(k, -1, -2)[:, :, None]) * np.asarray(scale, q.dtype)
    if bias is not None:
        scores = scores + bias.reshape(Hkv, G, T, Tk)
    visible = _visible(T, Tk, window)
    return np.where(visible, scores, -np.inf).astype(q.dtype, copy=False), visible


def _seen_keys(k, v, bias, T, window):
    """k, v and bias without the keys no query sees (see _first_seen_key), and how many were
    dropped: the twins then never multiply them, not even by 0 (a NaN there would come through)."""
    first = _first_seen_key(T, k.shape[2], window)
    return k[:, :, first:], v[:, :, first:], (bias[:, :, first:] if bias is not None else None), first


def attention_numpy(q, k, v, bias=None, scale=None, window=0):
    """Causal attention of q (B, H, T, hd) over k, v (B, Hkv, Tk, hd): returns
    (y (B, H, T, hd), lse (B, H, T)), lse the log-sum-exp of each query's scores for
    attention_backward. Scores are scale * q k^T (+ bias (H, T, Tk)); query i sees keys
    j <= i + Tk - T, and with window W >= 1 only the last W of them, j > i + Tk - T - W;
    query head h reads key/value head h // (H // Hkv). scale defaults to 1 / sqrt(hd).
    y is stored token by token, as the C core writes it."""
    window = _check_attention("attention", q, k, v, bias, window=window)
    k, v, bias, _ = _seen_keys(k, v, bias, q.shape[2], window)
    scores, visible = _attention_scores(q, k, bias, scale, window)  # (B, Hkv, G, T, Tk)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)  # initial: for Tk = 0
    lse = row_max + np.log(np.exp(scores - row_max).sum(axis=-1, keepdims=True))
    weights = np.where(visible, np.exp(scores - lse), 0)
    B, H, T, hd = q.shape
    y = weights @ v[:, :, None]  # (B, Hkv, G, T, Tk) @ (B, Hkv, 1, Tk, hd)
    return _in_token_order(y.reshape(B, H, T, hd)), lse.reshape(B, H, T)


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


def _scale(hd, scale):
    return float(1.0 / np.sqrt(hd) if scale is None else scale)


def attention_c(q, k, v, bias=None, scale=None, window=0):
    """Fused causal attention on the C core; same contract as attention_numpy. q, k and v are read
    where they lie (see _heads; k and v are copied head by head for LONG_QUERIES queries or more);
    y is written token by token. Under a window, key blocks outside every window are not read."""
    runtime.require_c("attention")
    window = _check_attention("attention", q, k, v, bias, window=window)
    if q.shape[1] == 0:  # no heads: an empty result, and C would divide by Hkv = 0
        return attention_numpy(q, k, v, bias, scale, window)
    long = q.shape[2] >= LONG_QUERIES
    (q, q_layout), (k, k_layout), (v, v_layout) = _heads(q), _heads(k, copy=long), _heads(v, copy=long)
    bias = runtime.contiguous(bias) if bias is not None else None
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    y, lse = _empty_in_token_order(q.shape, q.dtype), np.empty((B, H, T), q.dtype)
    y_layout = _heads(y)[1]
    status = runtime.c_function("attention", q.dtype)(
        pointer(q), q_layout, pointer(k), k_layout, pointer(v), v_layout, pointer(bias), pointer(y), y_layout,
        pointer(lse), B, H, Hkv, T, Tk, hd, window, _scale(hd, scale), runtime.get_num_threads())
    runtime.check_status("attention", status)
    return y, lse


def attention_naive_c(q, k, v, bias=None, scale=None, window=0):
    """The same attention on the C core's row-by-row reference (minqkv_attention_naive_f32/_f64):
    plain loops, one query row at a time, on one thread, slow. Same contract as attention_numpy,
    except that y is a plain C-contiguous (B, H, T, hd) array."""
    runtime.require_c("attention_naive", twin="attention_numpy")
    window = _check_attention("attention_naive", q, k, v, bias, window=window)
    if q.shape[1] == 0:  # no heads: an empty result, and C would divide by Hkv = 0
        return attention_numpy(q, k, v, bias, scale, window)
    q, k, v = runtime.contiguous(q), runtime.contiguous(k), runtime.contiguous(v)
    bias = runtime.contiguous(bias) if bias is not None else None
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    y, lse = np.empty(q.shape, q.dtype), np.empty((B, H, T), q.dtype)
    status = runtime.c_function("attention_naive", q.dtype)(
        pointer(q), pointer(k), pointer(v), pointer(bias), pointer(y), pointer(lse), B, H, Hkv, T, Tk, hd,
        window, _scale(hd, scale))
    runtime.check_status("attention_naive", status)
    return y, lse


def attention_backward_numpy(q, k, v, bias, y, lse, dy, scale=None, want_dbias=True, window=0):
    """(dq, dk, dv, dbias or None) through attention, recomputing the scores from lse: with
    p = e^(s - lse) and ds = p (dy v^T - sum(dy * y)), dq = scale ds k, dk = scale ds^T q,
    dv = p^T dy, dbias = ds summed over the batch (and over nothing else); dbias is None when
    there is no bias or want_dbias is false. Keys no query sees (window) get zero gradients.
    dq, dk and dv are stored token by token."""
    window = _check_attention("attention_backward", q, k, v, bias, (y, lse, dy), window)
    k, v, bias, first = _seen_keys(k, v, bias, q.shape[2], window)
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv if Hkv else 0
    scale = 1.0 / np.sqrt(hd) if scale is None else scale
    scores, visible = _attention_scores(q, k, bias, scale, window)
    p = np.where(visible, np.exp(scores - lse.reshape(B, Hkv, G, T, 1)), 0)  # (B, Hkv, G, T, Tk)
    dy5 = dy.reshape(B, Hkv, G, T, hd)
    row_dot = (dy5 * y.reshape(B, Hkv, G, T, hd)).sum(axis=-1, keepdims=True)  # D_i
    ds = p * (dy5 @ np.swapaxes(v, -1, -2)[:, :, None] - row_dot)
    scale = np.asarray(scale, q.dtype)
    dq = (ds @ k[:, :, None]) * scale
    dk = (np.swapaxes(ds, -1, -2) @ q.reshape(B, Hkv, G, T, hd)).sum(axis=2) * scale
    dv = (np.swapaxes(p, -1, -2) @ dy5).sum(axis=2)
    dbias = ds.sum(axis=0).reshape(H, T, Tk) if bias is not None and want_dbias else None
    if first:  # the unseen keys' zero gradients in front
        dk, dv = (np.concatenate([np.zeros((B, Hkv, first, hd), q.dtype), g], axis=2) for g in (dk, dv))
        if dbias is not None:
            dbias = np.concatenate([np.zeros((H, T, first), q.dtype), dbias], axis=2)
    return _in_token_order(dq.reshape(q.shape)), _in_token_order(dk), _in_token_order(dv), dbias


def attention_backward_c(q, k, v, bias, y, lse, dy, scale=None, want_dbias=True, window=0):
    """The gradients through fused causal attention on the C core; same contract as
    attention_backward_numpy. q, k, v, y and dy are read where they lie (see _heads; q, y and dy
    are copied head by head for LONG_QUERIES queries or more); dq, dk and dv are new arrays
    written token by token, so they overlap no input."""
    runtime.require_c("attention_backward")
    window = _check_attention("attention_backward", q, k, v, bias, (y, lse, dy), window)
    if q.shape[1] == 0:  # no heads: empty gradients, and C would divide by Hkv = 0
        return attention_backward_numpy(q, k, v, bias, y, lse, dy, scale, want_dbias, window)
    long = q.shape[2] >= LONG_QUERIES
    (k, k_layout), (v, v_layout) = _heads(k), _heads(v)
    (q, q_layout), (y, y_layout), (dy, dy_layout) = (_heads(x, copy=long) for x in (q, y, dy))
    lse = runtime.contiguous(lse)
    bias = runtime.contiguous(bias) if bias is not None else None
    B, H, T, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = (_empty_in_token_order(shape, q.dtype) for shape in (q.shape, k.shape, v.shape))
    dq_layout, dk_layout, dv_layout = _heads(dq)[1], _heads(dk)[1], _heads(dv)[1]
    dbias = np.empty(bias.shape, q.dtype) if bias is not None and want_dbias else None
    status = runtime.c_function("attention_backward", q.dtype)(
        pointer(q), q_layout, pointer(k), k_layout, pointer(v), v_layout, pointer(bias), pointer(y), y_layout,
        pointer(lse), pointer(dy), dy_layout, pointer(dq), dq_layout, pointer(dk), dk_layout, pointer(dv),
        dv_layout, pointer(dbias), B, H, Hkv, T, Tk, hd, window, _scale(hd, scale), runtime.get_num_threads())
    runtime.check_status("attention_backward", status)
    return dq, dk, dv, dbias
