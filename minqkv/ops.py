"""Differentiable ops. Each op computes its forward with NumPy (or a kernel of minqkv.kernels,
on the C core or its NumPy twin) and, right beside it, a closure `backward(g)` that maps the
gradient of the output to a tuple of gradients for its inputs, with the math in one comment line.

Read top to bottom: from the simplest ops up to the ones a Transformer is built from.
  arithmetic        add, sub, mul, div, neg, pow (and unbroadcast, which undoes broadcasting)
  elementwise       exp, log, tanh, sigmoid, clip, gelu
  reductions        sum, mean
  shape, indexing   reshape, transpose, swapaxes, getitem, embedding, concat, split
  matmul            matmul, linear (x @ w + b in one op), matmul_each (several products of one
                    input as one)
  softmax family    softmax, causal_attention (fused), cross_entropy
  normalisation     layer_norm, dropout
  linear algebra    solve (for the orthogonal rotation)
An op checks its inputs in one line at its top (the checks are in op_inputs.py, out of the way
of the math) and says nothing more about them.

dtype rule: float32 stays float32 and float64 stays float64. Mixing the two is an error;
Python numbers and int/bool arrays are converted to the tensor's dtype (so an op needs one Tensor).

Shapes: every shape NumPy accepts, 0-size and 0-d included, gives what PyTorch gives: an empty
product is an empty array, a sum over nothing is 0, and an input that fed no output gets a zero
gradient (tests/test_ops_shapes.py checks each op against torch.autograd). Refused where PyTorch
answers nan: the mean of nothing, cross_entropy over a vocabulary of 0.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .op_inputs import (as_pair, as_tensor, check_axis, check_concat, check_cross_entropy, check_dropout_p,
                        check_embedding, check_layer_norm, check_linear, check_matmul, check_matmul_each,
                        check_permutation, check_pow, check_reduction, check_solve, check_split, check_window,
                        float_tensor, is_basic_index, reshaped, tensor_input)
from .tensor import Tensor, is_grad_enabled, sum_of

# Arithmetic. Binary ops broadcast like NumPy, so their backward sums the gradient back down.


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a broadcast gradient back down to `shape` (the inverse of NumPy broadcasting)."""
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def add(a, b) -> Tensor:
    a, b = as_pair(a, b, "add")

    def backward(g):  # d(a+b) = g, g
        return unbroadcast(g, a.shape), unbroadcast(g, b.shape)

    return Tensor.from_op(sum_of(a.data, b.data), (a, b), backward, "add")


def sub(a, b) -> Tensor:
    a, b = as_pair(a, b, "sub")

    def backward(g):  # d(a-b) = g, -g
        return unbroadcast(g, a.shape), unbroadcast(-g, b.shape)

    return Tensor.from_op(a.data - b.data, (a, b), backward, "sub")


def mul(a, b) -> Tensor:
    a, b = as_pair(a, b, "mul")

    def backward(g):  # d(a*b) = g*b, g*a
        return unbroadcast(g * b.data, a.shape), unbroadcast(g * a.data, b.shape)

    return Tensor.from_op(a.data * b.data, (a, b), backward, "mul")


def div(a, b) -> Tensor:
    a, b = as_pair(a, b, "div")
    out = a.data / b.data

    def backward(g):  # d(a/b) = g/b, -g*a/b^2
        return unbroadcast(g / b.data, a.shape), unbroadcast(-g * out / b.data, b.shape)

    return Tensor.from_op(out, (a, b), backward, "div")


def neg(x: Tensor) -> Tensor:
    x = float_tensor(x, "neg")
    return Tensor.from_op(-x.data, (x,), lambda g: (-g,), "neg")  # d(-x) = -g


def pow(x: Tensor, exponent: float) -> Tensor:
    x = check_pow(x, exponent)

    def backward(g):  # d x^p = p x^(p-1) g  (and 0 for p = 0, even at x = 0)
        if exponent == 0:
            return (np.zeros_like(x.data),)
        return (g * exponent * x.data ** (exponent - 1),)

    return Tensor.from_op(x.data ** exponent, (x,), backward, "pow")


# Elementwise functions.


def exp(x: Tensor) -> Tensor:
    x = float_tensor(x, "exp")
    out = np.exp(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g * out,), "exp")  # d e^x = e^x g


def log(x: Tensor) -> Tensor:
    x = float_tensor(x, "log")
    return Tensor.from_op(np.log(x.data), (x,), lambda g: (g / x.data,), "log")  # d log x = g/x


def tanh(x: Tensor) -> Tensor:
    x = float_tensor(x, "tanh")
    out = np.tanh(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g * (1 - out * out),), "tanh")  # d tanh = 1-tanh^2


def sigmoid(x: Tensor) -> Tensor:
    x = float_tensor(x, "sigmoid")
    # written via tanh so large |x| never overflows exp
    out = 0.5 * (1 + np.tanh(0.5 * x.data))
    return Tensor.from_op(out, (x,), lambda g: (g * out * (1 - out),), "sigmoid")  # s(1-s)


def clip(x: Tensor, low: float, high: float) -> Tensor:
    """x limited to [low, high] elementwise (hard-concrete gates clip to exactly 0 or 1)."""
    x = float_tensor(x, "clip")
    if not low <= high:
        raise ValueError(f"clip needs low <= high, got low={low}, high={high}")
    inside = (x.data >= low) & (x.data <= high)  # bounds count as inside, as in torch.clamp
    out = np.clip(x.data, low, high)
    return Tensor.from_op(out, (x,), lambda g: (g * inside,), "clip")  # g inside, 0 where clipped


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation (as in GPT-2): 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi)."""
    x = float_tensor(x, "gelu")
    out = kernels.gelu(x.data)
    # d gelu: 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2), t = tanh(c (x + 0.044715 x^3))
    # np.asarray: on 0-d tensors NumPy arithmetic hands back a scalar, and the kernel takes arrays
    return Tensor.from_op(out, (x,), lambda g: (kernels.gelu_backward(x.data, np.asarray(g)),), "gelu")


# Reductions.


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    x, axes = check_reduction(x, axis, "sum")

    def backward(g):  # every input element receives the gradient of the sum it fed
        if not keepdims:
            g = np.expand_dims(g, axes)
        return (np.broadcast_to(g, x.shape).copy(),)

    return Tensor.from_op(x.data.sum(axis=axes, keepdims=keepdims), (x,), backward, "sum")


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    x, axes = check_reduction(x, axis, "mean", nonempty=True)
    count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    return sum(x, axes, keepdims) * (1.0 / count)  # a composition: its backward is sum's and mul's


# Shape and indexing: the values move, so the gradient moves back the same way.


def reshape(x: Tensor, *shape) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    out = reshaped(tensor_input(x, "reshape"), shape)
    return Tensor.from_op(out, (x,), lambda g: (g.reshape(x.shape),), "reshape")  # g in x's shape


def transpose(x: Tensor, *axes) -> Tensor:
    """Permute axes (all of them given) or, with no axes, reverse them."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    x = tensor_input(x, "transpose")
    axes = axes or tuple(reversed(range(x.ndim)))
    check_permutation(axes, x.ndim)
    inverse = sorted(range(x.ndim), key=lambda i: axes[i] % x.ndim)  # the permutation that undoes `axes`
    return Tensor.from_op(x.data.transpose(axes), (x,),
                          lambda g: (g.transpose(inverse),), "transpose")


def swapaxes(x: Tensor, axis1: int, axis2: int) -> Tensor:
    x = tensor_input(x, "swapaxes")
    axis1, axis2 = check_axis(axis1, x.ndim, "swapaxes", "axis1"), check_axis(axis2, x.ndim, "swapaxes", "axis2")
    axes = list(range(x.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(x, tuple(axes))


def getitem(x: Tensor, index) -> Tensor:
    """x[index] for any NumPy index; repeated indices accumulate their gradients."""
    x = tensor_input(x, "getitem")
    if isinstance(index, Tensor):
        index = index.data
    out = x.data[index]
    basic = is_basic_index(index)  # slices and integers: no position can repeat

    def backward(g):  # scatter-add the gradient back where the values came from
        grad = np.zeros_like(x.data)
        if basic:
            grad[index] = g  # each position once: a plain copy does what add.at does, much faster
        else:
            np.add.at(grad, index, g)
        return (grad,)

    return Tensor.from_op(out, (x,), backward, "getitem")


def embedding(weight: Tensor, ids) -> Tensor:
    """Rows of weight (V, C) picked by integer ids (...) -> (..., C)."""
    weight, ids = check_embedding(weight, ids)
    out = weight.data[ids]  # (..., C)

    def backward(g):  # each row of weight gets the sum of gradients of the positions that used it
        if weight.shape[1] == 0:  # rows of width 0: nothing to add (the kernel takes one column at least)
            return (np.zeros_like(weight.data),)
        rows = g.reshape(ids.size, weight.shape[1])  # (positions, C); explicit sizes: positions may be 0
        return (kernels.embedding_backward(ids.reshape(-1), rows, weight.shape[0]),)

    return Tensor.from_op(out, (weight,), backward, "embedding")


def concat(tensors, axis: int = 0) -> Tensor:
    tensors = check_concat(list(tensors))
    axis = check_axis(axis, tensors[0].ndim, "concat")
    out = np.concatenate([t.data for t in tensors], axis=axis)
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g):  # cut the gradient into the same pieces
        return tuple(np.split(g, bounds, axis=axis))

    return Tensor.from_op(out, tuple(tensors), backward, "concat")


def split(x: Tensor, sizes, axis: int = -1) -> list:
    """Split along axis into pieces of the given sizes (a list) or into `sizes` equal parts.

    Backward: each piece's gradient goes to its place in one array for x, written once (no sums
    of full-size arrays). The pieces hang from a private identity node, joint, and send it their
    gradients as _Pieces, which the engine's sum collects; joint runs after all of them and writes
    them into one array, with zeros where a piece got no gradient. Nothing outlives the walk."""
    axis = check_axis(axis, tensor_input(x, "split").ndim, "split")
    sizes = check_split(x.shape[axis], sizes)
    indexes, start = [], 0
    for size in sizes:
        indexes.append((slice(None),) * axis + (slice(start, start + size),))
        start += size

    def joint_backward(pieces):  # each piece's gradient in its place, zeros where none came
        grad = np.empty_like(x.data)
        for i, index in enumerate(indexes):
            grad[index] = pieces.grads[i] if i in pieces.grads else 0
        return (grad,)

    joint = Tensor.from_op(x.data, (x,), joint_backward, "split")
    return [Tensor.from_op(x.data[index], (joint,), _piece_backward(i), "split") for i, index in enumerate(indexes)]


def _piece_backward(i: int):
    return lambda g: (_Pieces({i: g}),)  # piece i's gradient, for the node the pieces were cut from


class _Pieces:
    """The gradient of a split tensor as its pieces send it: {piece number: gradient}. The engine
    adds the gradients a node receives; adding two of these collects their pieces (each piece
    sends once per backward walk), so the whole array is written once, by the split's joint, or
    never (matmul_each reads each piece's gradient where it lies)."""

    def __init__(self, grads: dict):
        self.grads = grads

    def __add__(self, other: "_Pieces") -> "_Pieces":
        return _Pieces({**self.grads, **other.grads})


# Matmul, on the C core.


def matmul(a, b) -> Tensor:
    """a @ b for a (..., M, K) and b (..., K, N); batch dims broadcast as in NumPy.

    The product runs in kernels.matmul (C or NumPy twin); the backward calls the same kernel
    with a transpose flag instead of transposing an operand. Copies still happen: folding
    broadcast batch dims into one copies that operand (under GQA, each key and value head once
    per query head of its group), and the C core copies an operand whose matrices are stored
    neither row- nor column-major.
    """
    a, b = check_matmul(a, b)
    if b.ndim == 2:
        return _matmul_weight(a, b)
    return _matmul_batched(a, b)


def linear(x, w, bias=None) -> Tensor:
    """x @ w + bias for x (..., K), w (K, N) and bias (N,) or None: a Linear layer in one op.

    The kernel adds the bias as it stores the product, so no second pass over the (..., N) output
    is made (matmul then add would write one more array the size of the output, and keep two nodes)."""
    x, w = check_linear(x, w, bias)
    return _matmul_weight(x, w, bias)


def _matmul_weight(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    # (..., M, K) @ (K, N) [+ bias (N,)]: fold all leading dims into rows, one 2-D GEMM
    K, N = b.shape
    P = int(np.prod(a.shape[:-1]))  # explicit: reshape(-1, K) cannot tell P when a is empty
    a2 = a.data.reshape(P, K)  # (P, K)
    out = kernels.matmul(a2, b.data, bias=None if bias is None else bias.data)  # (P, N)
    out = out.reshape(a.shape[:-1] + (N,))

    def backward(g):  # dA = g B^T, dB = A^T g, dbias = g summed over rows
        g2 = g.reshape(P, N)  # (P, N)
        grad_a = kernels.matmul(g2, b.data, trans_b=True).reshape(a.shape) if a.requires_grad else None
        grad_b = kernels.matmul(a2, g2, trans_a=True) if b.requires_grad else None
        if bias is None:
            return grad_a, grad_b
        return grad_a, grad_b, kernels.column_sums(g2) if bias.requires_grad else None

    parents = (a, b) if bias is None else (a, b, bias)
    return Tensor.from_op(out, parents, backward, "matmul" if bias is None else "linear")


def _matmul_batched(a: Tensor, b: Tensor) -> Tensor:
    # (..., M, K) @ (..., K, N): broadcast batch dims, fold them into one batch axis
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    Z = int(np.prod(batch))  # explicit: reshape(-1, M, K) cannot tell Z when an operand is empty
    a3 = np.broadcast_to(a.data, batch + (M, K)).reshape(Z, M, K)  # (Z, M, K)
    b3 = np.broadcast_to(b.data, batch + (K, N)).reshape(Z, K, N)  # (Z, K, N)
    out = kernels.matmul(a3, b3).reshape(batch + (M, N))

    def backward(g):  # dA = g B^T, dB = A^T g, then sum over broadcast batch dims
        g3 = g.reshape(Z, M, N)
        grad_a = grad_b = None
        if a.requires_grad:
            grad_a = unbroadcast(kernels.matmul(g3, b3, trans_b=True).reshape(batch + (M, K)), a.shape)
        if b.requires_grad:
            grad_b = unbroadcast(kernels.matmul(a3, g3, trans_a=True).reshape(batch + (K, N)), b.shape)
        return grad_a, grad_b

    return Tensor.from_op(out, (a, b), backward, "matmul")


def matmul_each(x: Tensor, weights: list) -> list:
    """[x @ w for w in weights], computed as one product: x (..., K) @ [w_1 | w_2 | ...] (K, N1 + N2 + ...).

    One wide GEMM runs faster than several narrow ones (an attention layer's Q, K and V, say). The
    results are views of the joined product, and their gradients are not joined back: the backward
    pass takes each piece's gradient g_i where it lies (attention hands back dq, dk and dv as three
    arrays) and sums dx = g_1 w_1^T + g_2 w_2^T + ... inside the GEMM, saving a copy of the
    (..., N1 + N2 + ...) gradient per call."""
    if len(weights) <= 1:
        return [matmul(x, w) for w in weights]
    x, weights = check_matmul_each(x, weights)
    K = x.shape[-1]
    joined_weights = np.concatenate([w.data for w in weights], axis=1)  # (K, N)
    N = joined_weights.shape[1]
    P = int(np.prod(x.shape[:-1]))  # explicit: reshape(-1, K) cannot tell P when x is empty
    x2 = x.data.reshape(P, K)  # (P, K)
    out = kernels.matmul(x2, joined_weights).reshape(x.shape[:-1] + (N,))  # (..., N)
    columns, start = [], 0
    for w in weights:
        columns.append(slice(start, start + w.shape[1]))
        start += w.shape[1]

    def backward(pieces):  # g_i for the pieces that got one: dx = sum_i g_i w_i^T, dw_i = x^T g_i (0 if no g_i)
        grad_x, grad_ws = None, []
        for i, w in enumerate(weights):
            g_i = pieces.grads.get(i)
            if g_i is None:
                grad_ws.append(np.zeros_like(w.data) if w.requires_grad else None)
                continue
            g2 = g_i.reshape(P, w.shape[1])  # (P, N_i)
            if x.requires_grad:  # the first product makes grad_x (P, K), the others add into it
                grad_x = kernels.matmul(g2, w.data, trans_b=True, add_to=grad_x)
            grad_ws.append(kernels.matmul(x2, g2, trans_a=True) if w.requires_grad else None)  # (K, N_i)
        if x.requires_grad and grad_x is None:  # no piece got a gradient
            grad_x = np.zeros((P, K), x.dtype)
        return (None if grad_x is None else grad_x.reshape(x.shape), *grad_ws)

    joined = Tensor.from_op(out, (x, *weights), backward, "matmul_each")
    return [Tensor.from_op(out[..., index], (joined,), _piece_backward(i), "matmul_each")
            for i, index in enumerate(columns)]


# The softmax family: attention's softmax and the loss.


def softmax(x: Tensor, causal: bool = False) -> Tensor:
    """Softmax over the last axis (C core). causal=True masks key j > query i + (Tk - Tq)."""
    x = float_tensor(x, "softmax")
    if x.ndim == 0 and not causal:  # as in PyTorch, one row of one element: 1, with gradient 0
        return reshape(softmax(reshape(x, (1,))), ())
    out = kernels.softmax(x.data, causal=causal)
    # d softmax: y * (g - sum(g*y))
    return Tensor.from_op(out, (x,), lambda g: (kernels.softmax_backward(out, g),), "softmax")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None,
                     window: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias, causal) v in one fused kernel, keeping no (T, Tk) matrix.

    q (B, H, T, hd), k and v (B, Hkv, Tk, hd) (query head h reads key/value head h // (H // Hkv)),
    bias (H, T, Tk) or None -> (B, H, T, hd). Query i sees keys j <= i + Tk - T; with a window W,
    only the last W of them (j > i + Tk - T - W), and the kernels skip the rest. The forward pass
    keeps one number per query (the log of its softmax denominator); the backward pass recomputes
    the scores from it. attention.scores_and_weights and attention.weighted_values compute the
    same, step by step, keeping the matrices; attention.attend runs this op unless dropout is active.

    No layout copies: q, k and v may be views with gaps, such as the heads of one (B, T, 3C)
    projection seen as (B, H, T, hd), and the kernel reads them there; y (and the gradients of
    q, k and v) are stored token by token, (B, T, H, hd) in memory, so that merging the heads
    back into (B, T, H * hd), and undoing the heads' split in the backward pass, are views too.
    """
    q = float_tensor(q, "causal_attention", "q")  # shapes are checked by the kernel, by name
    k, v = as_tensor(k, q, "causal_attention", "k"), as_tensor(v, q, "causal_attention", "v")
    bias = as_tensor(bias, q, "causal_attention", "bias") if bias is not None else None
    bias_data = bias.data if bias is not None else None
    parents = (q, k, v) if bias is None else (q, k, v, bias)
    if _heads_of_no_width(q, k, v):  # hd = 0: nothing to attend to, as in PyTorch; the kernels take hd >= 1
        return Tensor.from_op(np.zeros(q.shape, q.dtype), parents,
                              lambda g: tuple(np.zeros(p.shape, p.dtype) for p in parents), "causal_attention")
    window = check_window(window)  # 0: every earlier key
    y, lse = kernels.attention(q.data, k.data, v.data, bias_data, window=window)  # (B, H, T, hd), (B, H, T)

    def backward(g):  # ds = p (g v^T - rowsum(g * y)); dq = ds k / sqrt(hd), dk = ds^T q / sqrt(hd), dv = p^T g
        want_dbias = bias is not None and bias.requires_grad
        dq, dk, dv, dbias = kernels.attention_backward(q.data, k.data, v.data, bias_data, y, lse, g,
                                                       want_dbias=want_dbias, window=window)
        return (dq, dk, dv) if bias is None else (dq, dk, dv, dbias)

    return Tensor.from_op(y, parents, backward, "causal_attention")


def _heads_of_no_width(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """q, k and v are 4-D with head width 0 and otherwise fit together: the empty attention (y has
    no elements; every gradient is zero). Anything that does not fit goes on to the kernel's checks."""
    if not (q.ndim == k.ndim == v.ndim == 4 and q.shape[3] == k.shape[3] == v.shape[3] == 0):
        return False
    (B, H, T, _), (Bk, Hkv, Tk, _) = q.shape, k.shape
    return k.shape == v.shape and B == Bk and Tk >= T and (H == Hkv == 0 or (Hkv > 0 and H % Hkv == 0))


def cross_entropy(logits: Tensor, targets, ignore_index: int = -1) -> Tensor:
    """Mean negative log-likelihood of integer targets under softmax(logits), fused.

    logits (..., V), targets (...) ints. Positions whose target is ignore_index do not count;
    if every position is ignored the loss is 0 with zero gradient. The kernel computes the
    gradient in the same pass as the loss (when one is needed), so backward only scales it.
    """
    logits, targets = check_cross_entropy(logits, targets, ignore_index)
    flat_targets = targets.reshape(-1)  # (N,)
    count = max(int(np.count_nonzero(flat_targets != ignore_index)), 1)
    want_grad = is_grad_enabled() and logits.requires_grad
    rows = logits.data.reshape(flat_targets.size, logits.shape[-1])  # (N, V); explicit sizes: N may be 0
    losses, dlogits = kernels.cross_entropy(rows, flat_targets, ignore_index, scale=1.0 / count,
                                            want_grad=want_grad)  # (N,), (N, V)
    loss = losses.sum() / count

    def backward(g):  # (softmax - onehot(target)) / count on counted rows, 0 elsewhere
        return ((dlogits * g).reshape(logits.shape),)

    return Tensor.from_op(np.asarray(loss, dtype=logits.dtype), (logits,), backward, "cross_entropy")


# Normalisation and dropout.


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Normalise the last axis to zero mean, unit variance, then scale and shift (fused)."""
    x = check_layer_norm(x, weight, bias, eps)
    parents = (x, weight) if bias is None else (x, weight, bias)
    if x.ndim and x.shape[-1] == 0 and all(p.shape == (0,) for p in parents[1:]):
        # rows of no elements (the kernels take one or more): an empty result, zero gradients, as in PyTorch
        return Tensor.from_op(x.data.copy(), parents, lambda g: tuple(np.zeros_like(p.data) for p in parents),
                              "layer_norm")
    out, mean, rstd = kernels.layer_norm(x.data, weight.data, bias.data if bias is not None else None, eps)

    def backward(g):  # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = g * weight
        dx, dweight, dbias = kernels.layer_norm_backward(x.data, weight.data, mean, rstd, g, bias is not None)
        return (dx, dweight) if bias is None else (dx, dweight, dbias)

    return Tensor.from_op(out, parents, backward, "layer_norm")


def dropout(x: Tensor, p: float, rng: np.random.Generator, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (identity when not training)."""
    x = float_tensor(x, "dropout")
    check_dropout_p(p, "dropout")
    if not training or p == 0:
        return x
    keep = (rng.random(x.shape) >= p).astype(x.dtype) * (1.0 / (1.0 - p))
    return Tensor.from_op(x.data * keep, (x,), lambda g: (g * keep,), "dropout")  # g * keep


# Linear algebra, for the orthogonal rotation (a Cayley transform: R = (I + A)^-1 (I - A)).


def solve(A: Tensor, B: Tensor) -> Tensor:
    """X with A X = B, for A (..., n, n) and B (..., n, k)."""
    A, B = check_solve(A, B)
    X = np.linalg.solve(A.data, B.data)

    def backward(g):  # dB = A^-T g, dA = -dB X^T
        grad_b = np.linalg.solve(np.swapaxes(A.data, -1, -2), g)
        grad_a = -grad_b @ np.swapaxes(X, -1, -2)
        return unbroadcast(grad_a, A.shape), unbroadcast(grad_b, B.shape)

    return Tensor.from_op(X, (A, B), backward, "solve")
