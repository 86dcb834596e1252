"""Differentiable ops. Each op computes its forward with NumPy (or the C core through
kernels.py) and, right beside it, a closure `backward(g)` that maps the gradient of the
output to a tuple of gradients for its inputs, with the math in one comment line.

Read top to bottom: from the simplest ops up to the ones a Transformer is built from.
  arithmetic        add, sub, mul, div, neg, pow (and unbroadcast, which undoes broadcasting)
  elementwise       exp, log, tanh, sigmoid, relu, gelu
  reductions        sum, mean
  shape, indexing   reshape, transpose, swapaxes, broadcast_to, getitem, embedding, concat, split
  matmul            through the C core; linear (x @ w + b in one op); matmul_each, several
                    products of one input as one
  softmax family    softmax, causal_attention (fused), log_softmax, cross_entropy
  normalisation     layer_norm, dropout, masked_fill, causal_mask, where
  linear algebra    solve, inverse (for the orthogonal rotation)
Input checks sit at the bottom of the file; an op calls them in one line at its top and
says nothing more about them.

dtype rule: float32 stays float32 and float64 stays float64. Mixing the two is an error;
Python numbers and int/bool arrays are converted to the tensor's dtype.
"""

from __future__ import annotations

import builtins

import numpy as np

from . import kernels
from .tensor import FLOAT_DTYPES, Tensor, backward_walk, is_grad_enabled

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
    a, b = _pair(a, b, "add")

    def backward(g):  # d(a+b) = g, g
        return unbroadcast(g, a.shape), unbroadcast(g, b.shape)

    return Tensor.from_op(a.data + b.data, (a, b), backward, "add")


def sub(a, b) -> Tensor:
    a, b = _pair(a, b, "sub")

    def backward(g):  # d(a-b) = g, -g
        return unbroadcast(g, a.shape), unbroadcast(-g, b.shape)

    return Tensor.from_op(a.data - b.data, (a, b), backward, "sub")


def mul(a, b) -> Tensor:
    a, b = _pair(a, b, "mul")

    def backward(g):  # d(a*b) = g*b, g*a
        return unbroadcast(g * b.data, a.shape), unbroadcast(g * a.data, b.shape)

    return Tensor.from_op(a.data * b.data, (a, b), backward, "mul")


def div(a, b) -> Tensor:
    a, b = _pair(a, b, "div")
    out = a.data / b.data

    def backward(g):  # d(a/b) = g/b, -g*a/b^2
        return unbroadcast(g / b.data, a.shape), unbroadcast(-g * out / b.data, b.shape)

    return Tensor.from_op(out, (a, b), backward, "div")


def neg(x: Tensor) -> Tensor:
    x = _float_tensor(x, "neg")
    return Tensor.from_op(-x.data, (x,), lambda g: (-g,), "neg")  # d(-x) = -g


def pow(x: Tensor, exponent: float) -> Tensor:
    x = _check_pow(x, exponent)

    def backward(g):  # d x^p = p x^(p-1) g  (and 0 for p = 0, even at x = 0)
        if exponent == 0:
            return (np.zeros_like(x.data),)
        return (g * exponent * x.data ** (exponent - 1),)

    return Tensor.from_op(x.data ** exponent, (x,), backward, "pow")


# Elementwise functions.


def exp(x: Tensor) -> Tensor:
    x = _float_tensor(x, "exp")
    out = np.exp(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g * out,), "exp")  # d e^x = e^x g


def log(x: Tensor) -> Tensor:
    x = _float_tensor(x, "log")
    return Tensor.from_op(np.log(x.data), (x,), lambda g: (g / x.data,), "log")  # d log x = g/x


def tanh(x: Tensor) -> Tensor:
    x = _float_tensor(x, "tanh")
    out = np.tanh(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g * (1 - out * out),), "tanh")  # d tanh = 1-tanh^2


def sigmoid(x: Tensor) -> Tensor:
    x = _float_tensor(x, "sigmoid")
    # written via tanh so large |x| never overflows exp
    out = 0.5 * (1 + np.tanh(0.5 * x.data))
    return Tensor.from_op(out, (x,), lambda g: (g * out * (1 - out),), "sigmoid")  # s(1-s)


def clip(x: Tensor, low: float, high: float) -> Tensor:
    """x limited to [low, high] elementwise (hard-concrete gates clip to exactly 0 or 1)."""
    x = _float_tensor(x, "clip")
    if not low <= high:
        raise ValueError(f"clip needs low <= high, got low={low}, high={high}")
    inside = (x.data >= low) & (x.data <= high)  # bounds count as inside, as in torch.clamp
    out = np.clip(x.data, low, high)
    return Tensor.from_op(out, (x,), lambda g: (g * inside,), "clip")  # g inside, 0 where clipped


def relu(x: Tensor) -> Tensor:
    x = _float_tensor(x, "relu")
    positive = x.data > 0
    return Tensor.from_op(x.data * positive, (x,), lambda g: (g * positive,), "relu")  # g where x > 0


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation (as in GPT-2): 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi)."""
    x = _float_tensor(x, "gelu")
    out = kernels.gelu(x.data)
    # d gelu: 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2), t = tanh(c (x + 0.044715 x^3))
    return Tensor.from_op(out, (x,), lambda g: (kernels.gelu_backward(x.data, g),), "gelu")


# Reductions.


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    x, axes = _check_reduction(x, axis, "sum")

    def backward(g):  # every input element receives the gradient of the sum it fed
        if not keepdims:
            g = np.expand_dims(g, axes)
        return (np.broadcast_to(g, x.shape).copy(),)

    return Tensor.from_op(x.data.sum(axis=axes, keepdims=keepdims), (x,), backward, "sum")


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    x, axes = _check_reduction(x, axis, "mean", nonempty=True)
    count = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    return sum(x, axes, keepdims) * (1.0 / count)  # a composition: its backward is sum's and mul's


# Shape and indexing: the values move, so the gradient moves back the same way.


def reshape(x: Tensor, *shape) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    out = _reshaped(x, shape)
    return Tensor.from_op(out, (x,), lambda g: (g.reshape(x.shape),), "reshape")  # g in x's shape


def transpose(x: Tensor, *axes) -> Tensor:
    """Permute axes (all of them given) or, with no axes, reverse them."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    axes = axes or tuple(reversed(range(x.ndim)))
    _check_permutation(axes, x.ndim)
    inverse = sorted(range(x.ndim), key=lambda i: axes[i] % x.ndim)  # the permutation that undoes `axes`
    return Tensor.from_op(x.data.transpose(axes), (x,),
                          lambda g: (g.transpose(inverse),), "transpose")


def swapaxes(x: Tensor, axis1: int, axis2: int) -> Tensor:
    axes = list(range(x.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(x, tuple(axes))


def broadcast_to(x: Tensor, shape: tuple) -> Tensor:
    x = _check_broadcast_to(x, shape)
    out = np.broadcast_to(x.data, shape)
    # d broadcast_to: sum g over the copies
    return Tensor.from_op(out, (x,), lambda g: (unbroadcast(g, x.shape),), "broadcast_to")


def getitem(x: Tensor, index) -> Tensor:
    """x[index] for any NumPy index; repeated indices accumulate their gradients."""
    if isinstance(index, Tensor):
        index = index.data
    out = x.data[index]
    basic = _is_basic_index(index)  # slices and integers: no position can repeat

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
    weight, ids = _check_embedding(weight, ids)
    out = weight.data[ids]  # (..., C)

    def backward(g):  # each row of weight gets the sum of gradients of the positions that used it
        return (kernels.embedding_backward(ids.reshape(-1), g.reshape(-1, weight.shape[1]), weight.shape[0]),)

    return Tensor.from_op(out, (weight,), backward, "embedding")


def concat(tensors, axis: int = 0) -> Tensor:
    tensors = _check_concat(list(tensors))
    out = np.concatenate([t.data for t in tensors], axis=axis)
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g):  # cut the gradient into the same pieces
        return tuple(np.split(g, bounds, axis=axis))

    return Tensor.from_op(out, tuple(tensors), backward, "concat")


def split(x: Tensor, sizes, axis: int = -1) -> list:
    """Split along axis into pieces of the given sizes (a list) or into `sizes` equal parts.

    Backward: x[piece] = g of each piece. The pieces write into one gradient array for x (no
    sums of full-size arrays): in each backward walk, the first piece to run creates it and hands
    it on, the others fill in their part. The pieces' one parent is a private identity node
    (joint), which runs after all of them: it zeroes the parts of pieces that got no gradient,
    so the array needs no zero fill of its own, and no other gradient of x is added to it before
    all are in."""
    sizes = _check_split(x.shape[axis], sizes)
    axis = axis % x.ndim
    indexes, start = [], 0
    for size in sizes:
        indexes.append((slice(None),) * axis + (slice(start, start + size),))
        start += size
    shared = {"walk": None, "grad": None, "written": set()}

    def joint_backward(g):  # every piece that got a gradient has written it: zero the others' parts
        for i, index in enumerate(indexes):
            if i not in shared["written"]:
                g[index] = 0
        shared["grad"] = None  # keep no reference
        return (g,)

    joint = Tensor.from_op(x.data, (x,), joint_backward, "split")
    return [Tensor.from_op(x.data[index], (joint,), _split_piece_backward(i, index, shared, x), "split")
            for i, index in enumerate(indexes)]


def _split_piece_backward(i: int, index: tuple, shared: dict, x: Tensor):
    def backward(g):  # the piece's gradient into x's array at index; the walk's first piece hands it on
        first = shared["walk"] != backward_walk() or shared["grad"] is None
        if first:
            shared["walk"], shared["grad"], shared["written"] = backward_walk(), np.empty_like(x.data), set()
        shared["grad"][index] = g
        shared["written"].add(i)
        return (shared["grad"] if first else None,)

    return backward


# Matmul, on the C core.


def matmul_each(x: Tensor, weights: list) -> list:
    """[x @ w for w in weights], computed as one product: x (..., K) @ [w_1 | w_2 | ...] (K, N1 + N2 + ...).

    One wide GEMM runs faster than several narrow ones (an attention layer's Q, K and V, say).
    A composition of concat, matmul and split, so it needs no backward of its own."""
    if len(weights) <= 1:
        return [matmul(x, w) for w in weights]
    joined = matmul(x, concat(weights, axis=1))  # (..., N1 + N2 + ...)
    return split(joined, [w.shape[1] for w in weights], axis=-1)


def matmul(a, b) -> Tensor:
    """a @ b for a (..., M, K) and b (..., K, N); batch dims broadcast as in NumPy.

    The product runs in kernels.matmul (C or NumPy twin); the backward calls the same kernel
    with a transpose flag instead of transposing an operand. Copies still happen: folding
    broadcast batch dims into one copies that operand (under GQA, each key and value head once
    per query head of its group), and the C core copies an operand whose matrices are stored
    neither row- nor column-major.
    """
    a, b = _check_matmul(a, b)
    if b.ndim == 2:
        return _matmul_weight(a, b)
    return _matmul_batched(a, b)


def linear(x, w, bias=None) -> Tensor:
    """x @ w + bias for x (..., K), w (K, N) and bias (N,) or None: a Linear layer in one op.

    The bias is added into the fresh product in place, so no second (..., N) array is made
    (matmul then add would write one more array the size of the output, and keep two nodes)."""
    x, w = _check_linear(x, w, bias)
    return _matmul_weight(x, w, bias)


def _matmul_weight(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    # (..., M, K) @ (K, N) [+ bias (N,)]: fold all leading dims into rows, one 2-D GEMM
    K, N = b.shape
    a2 = a.data.reshape(-1, K)  # (P, K)
    out = kernels.matmul(a2, b.data)  # (P, N)
    if bias is not None:
        out += bias.data  # into the product just made: nothing else holds it yet
    out = out.reshape(a.shape[:-1] + (N,))

    def backward(g):  # dA = g B^T, dB = A^T g, dbias = g summed over rows
        g2 = g.reshape(-1, N)  # (P, N)
        grad_a = kernels.matmul(g2, b.data, trans_b=True).reshape(a.shape) if a.requires_grad else None
        grad_b = kernels.matmul(a2, g2, trans_a=True) if b.requires_grad else None
        if bias is None:
            return grad_a, grad_b
        return grad_a, grad_b, g2.sum(axis=0) if bias.requires_grad else None

    parents = (a, b) if bias is None else (a, b, bias)
    return Tensor.from_op(out, parents, backward, "matmul" if bias is None else "linear")


def _matmul_batched(a: Tensor, b: Tensor) -> Tensor:
    # (..., M, K) @ (..., K, N): broadcast batch dims, fold them into one batch axis
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    a3 = np.broadcast_to(a.data, batch + (M, K)).reshape(-1, M, K)  # (Z, M, K)
    b3 = np.broadcast_to(b.data, batch + (K, N)).reshape(-1, K, N)  # (Z, K, N)
    out = kernels.matmul(a3, b3).reshape(batch + (M, N))

    def backward(g):  # dA = g B^T, dB = A^T g, then sum over broadcast batch dims
        g3 = g.reshape(-1, M, N)
        grad_a = grad_b = None
        if a.requires_grad:
            grad_a = unbroadcast(kernels.matmul(g3, b3, trans_b=True).reshape(batch + (M, K)), a.shape)
        if b.requires_grad:
            grad_b = unbroadcast(kernels.matmul(a3, g3, trans_a=True).reshape(batch + (K, N)), b.shape)
        return grad_a, grad_b

    return Tensor.from_op(out, (a, b), backward, "matmul")


# The softmax family: attention's softmax and the loss.


def softmax(x: Tensor, causal: bool = False) -> Tensor:
    """Softmax over the last axis (C core). causal=True masks key j > query i + (Tk - Tq)."""
    x = _float_tensor(x, "softmax")
    out = kernels.softmax(x.data, causal=causal)
    # d softmax: y * (g - sum(g*y))
    return Tensor.from_op(out, (x,), lambda g: (kernels.softmax_backward(out, g),), "softmax")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias, causal) v in one fused kernel, keeping no (T, Tk) matrix.

    q (B, H, T, hd), k and v (B, Hkv, Tk, hd) (query head h reads key/value head h // (H // Hkv)),
    bias (H, T, Tk) or None -> (B, H, T, hd). Query i sees keys j <= i + Tk - T. The forward pass
    keeps one number per query (the log of its softmax denominator); the backward pass recomputes
    the scores from it. attention.attend computes the same, step by step, keeping the matrices.

    No layout copies: q, k and v may be views with gaps, such as the heads of one (B, T, 3C)
    projection seen as (B, H, T, hd), and the kernel reads them there; y (and the gradients of
    q, k and v) are stored token by token, (B, T, H, hd) in memory, so that merging the heads
    back into (B, T, H * hd), and undoing the heads' split in the backward pass, are views too.
    """
    q = _float_tensor(q, "causal_attention", "q")  # shapes are checked by the kernel, by name
    k, v = _as_tensor(k, q, "causal_attention", "k"), _as_tensor(v, q, "causal_attention", "v")
    bias = _as_tensor(bias, q, "causal_attention", "bias") if bias is not None else None
    bias_data = bias.data if bias is not None else None
    y, lse = kernels.attention(q.data, k.data, v.data, bias_data)  # (B, H, T, hd), (B, H, T)
    parents = (q, k, v) if bias is None else (q, k, v, bias)

    def backward(g):  # ds = p (g v^T - rowsum(g * y)); dq = ds k / sqrt(hd), dk = ds^T q / sqrt(hd), dv = p^T g
        want_dbias = bias is not None and bias.requires_grad
        dq, dk, dv, dbias = kernels.attention_backward(q.data, k.data, v.data, bias_data, y, lse, g,
                                                       want_dbias=want_dbias)
        return (dq, dk, dv) if bias is None else (dq, dk, dv, dbias)

    return Tensor.from_op(y, parents, backward, "causal_attention")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    # log softmax over the last axis, stable: x - max - log(sum(exp(x - max)))
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def log_softmax(x: Tensor) -> Tensor:
    """log softmax over the last axis."""
    x = _float_tensor(x, "log_softmax")
    out = _log_softmax(x.data)

    def backward(g):  # g - softmax * sum(g)
        return (g - np.exp(out) * g.sum(axis=-1, keepdims=True),)

    return Tensor.from_op(out, (x,), backward, "log_softmax")


def cross_entropy(logits: Tensor, targets, ignore_index: int = -1) -> Tensor:
    """Mean negative log-likelihood of integer targets under softmax(logits), fused.

    logits (..., V), targets (...) ints. Positions whose target is ignore_index do not count;
    if every position is ignored the loss is 0 with zero gradient. The kernel computes the
    gradient in the same pass as the loss (when one is needed), so backward only scales it.
    """
    logits, targets = _check_cross_entropy(logits, targets, ignore_index)
    flat_targets = targets.reshape(-1)  # (N,)
    count = max(int(np.count_nonzero(flat_targets != ignore_index)), 1)
    want_grad = is_grad_enabled() and logits.requires_grad
    losses, dlogits = kernels.cross_entropy(logits.data.reshape(-1, logits.shape[-1]), flat_targets,
                                            ignore_index, scale=1.0 / count, want_grad=want_grad)  # (N,), (N, V)
    loss = losses.sum() / count

    def backward(g):  # (softmax - onehot(target)) / count on counted rows, 0 elsewhere
        return ((dlogits * g).reshape(logits.shape),)

    return Tensor.from_op(np.asarray(loss, dtype=logits.dtype), (logits,), backward, "cross_entropy")


# Normalisation, dropout and masking.


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Normalise the last axis to zero mean, unit variance, then scale and shift (fused)."""
    x = _check_layer_norm(x, weight, bias)
    out, mean, rstd = kernels.layer_norm(x.data, weight.data, bias.data if bias is not None else None, eps)
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):  # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = g * weight
        dx, dweight, dbias = kernels.layer_norm_backward(x.data, weight.data, mean, rstd, g, bias is not None)
        return (dx, dweight) if bias is None else (dx, dweight, dbias)

    return Tensor.from_op(out, parents, backward, "layer_norm")


def dropout(x: Tensor, p: float, rng: np.random.Generator, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (identity when not training)."""
    _check_dropout_p(p, "dropout")
    if not training or p == 0:
        return x
    keep = (rng.random(x.shape) >= p).astype(x.dtype) * (1.0 / (1.0 - p))
    return Tensor.from_op(x.data * keep, (x,), lambda g: (g * keep,), "dropout")  # g * keep


def masked_fill(x: Tensor, mask, value: float) -> Tensor:
    """x with `value` where the boolean mask (broadcast to x) is True; no gradient flows there."""
    x = _float_tensor(x, "masked_fill")
    mask = _boolean(np.asarray(mask), "masked_fill", "mask")
    out = np.where(mask, np.asarray(value, dtype=x.dtype), x.data)
    # d masked_fill: g where kept, 0 where filled (summed back if the mask broadcast x)
    return Tensor.from_op(out, (x,), lambda g: (unbroadcast(np.where(mask, 0, g), x.shape),),
                          "masked_fill")


def causal_mask(Tq: int, Tk: int) -> np.ndarray:
    """Boolean (Tq, Tk): True where query i must NOT see key j (j > i + Tk - Tq)."""
    return np.triu(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)


def where(condition, a, b) -> Tensor:
    """Elementwise choice: a where condition is True, else b."""
    a, b = _pair(a, b, "where")
    condition = _boolean(np.asarray(condition.data if isinstance(condition, Tensor) else condition),
                         "where", "condition")

    def backward(g):  # the gradient goes to whichever side was chosen
        return (unbroadcast(np.where(condition, g, 0), a.shape),
                unbroadcast(np.where(condition, 0, g), b.shape))

    return Tensor.from_op(np.where(condition, a.data, b.data), (a, b), backward, "where")


# Linear algebra, for the orthogonal rotation (a Cayley transform).


def solve(A: Tensor, B: Tensor) -> Tensor:
    """X with A X = B, for A (..., n, n) and B (..., n, k)."""
    A, B = _check_solve(A, B)
    X = np.linalg.solve(A.data, B.data)

    def backward(g):  # dB = A^-T g, dA = -dB X^T
        grad_b = np.linalg.solve(np.swapaxes(A.data, -1, -2), g)
        grad_a = -grad_b @ np.swapaxes(X, -1, -2)
        return unbroadcast(grad_a, A.shape), unbroadcast(grad_b, B.shape)

    return Tensor.from_op(X, (A, B), backward, "solve")


def inverse(A: Tensor) -> Tensor:
    """A^-1 for A (..., n, n)."""
    A = _check_square(_float_tensor(A, "inverse", "A"), "inverse")
    Y = np.linalg.inv(A.data)

    def backward(g):  # dA = -Y^T g Y^T
        Yt = np.swapaxes(Y, -1, -2)
        return (-(Yt @ g @ Yt),)

    return Tensor.from_op(Y, (A,), backward, "inverse")


# Input checks. Each returns its inputs in the form the op uses (Tensors of one dtype, a tuple
# of axes, a list of sizes) or raises an error that names the op and says what was wrong.


def _pair(a, b, op: str, broadcast: bool = True) -> tuple[Tensor, Tensor]:
    """Turn the operands of a binary op into two Tensors of one float dtype."""
    like = a if isinstance(a, Tensor) else b
    a, b = _as_tensor(a, like, op, "a"), _as_tensor(b, like, op, "b")
    if broadcast:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ValueError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast "
                             "(trailing dimensions must be equal or 1)") from None
    return a, b


def _as_tensor(x, like: Tensor, op: str, name: str) -> Tensor:
    if isinstance(x, Tensor):
        if x.dtype != like.dtype:
            raise _dtype_mismatch(op, f"{name} is {x.dtype}", f"the other operand is {like.dtype}")
        return x
    array = np.asarray(x)
    if array.dtype in FLOAT_DTYPES and array.ndim > 0 and array.dtype != like.dtype:
        raise _dtype_mismatch(op, f"{name} is a {array.dtype} array", f"the tensor is {like.dtype}")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{op}: {name} must be a number, a numeric array or a Tensor, "
                        f"got {type(x).__name__}")
    return Tensor(array.astype(like.dtype, copy=False))


def _dtype_mismatch(op: str, this: str, other: str) -> TypeError:
    return TypeError(f"{op}: {this} but {other}; dtypes never change silently, convert one explicitly")


def _float_tensor(x, op: str, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {x.dtype}")
    return x


def _integers(x, op: str, name: str) -> np.ndarray:
    """The integer array in x (a Tensor, an array or a list)."""
    array = x.data if isinstance(x, Tensor) else np.asarray(x)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{op}: {name} must be integers, got {array.dtype}")
    return array


def _boolean(array: np.ndarray, op: str, name: str) -> np.ndarray:
    if array.dtype != np.bool_:
        raise TypeError(f"{op}: {name} must be boolean, got {array.dtype}")
    return array


def _is_basic_index(index) -> bool:
    """Whether an index only slices and picks (ints, slices, ..., None): no element twice."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(part, (slice, int, np.integer)) or part is Ellipsis or part is None
               for part in parts)


def _check_pow(x, exponent) -> Tensor:
    x = _float_tensor(x, "pow")
    if not isinstance(exponent, (int, float)) or isinstance(exponent, bool):
        raise TypeError(f"pow: exponent must be a Python number, got {type(exponent).__name__}")
    return x


def _check_reduction(x, axis, op: str, nonempty: bool = False) -> tuple[Tensor, tuple]:
    """x and its reduced axes as a tuple of non-negative ints (all axes for axis=None)."""
    x = _float_tensor(x, op)
    every_axis = tuple(range(x.ndim))
    axes = every_axis if axis is None else (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    for a in axes:
        if not -x.ndim <= a < max(x.ndim, 1):
            raise ValueError(f"{op}: axis {a} is out of range for a tensor with {x.ndim} dimensions")
    axes = tuple(a % max(x.ndim, 1) for a in axes)
    if nonempty and any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"{op}: cannot average over an empty axis (shape {x.shape})")
    return x, axes


def _reshaped(x: Tensor, shape: tuple) -> np.ndarray:
    """x's data in the new shape; NumPy's own rules decide what fits, the error names the op."""
    try:
        return x.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {x.shape} "
                         f"({x.size} elements) into {shape}") from None


def _check_permutation(axes: tuple, ndim: int) -> None:
    in_range = all(-ndim <= a < ndim for a in axes)
    if not in_range or sorted(a % ndim for a in axes) != list(range(ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of {ndim} axes")


def _check_broadcast_to(x, shape: tuple) -> Tensor:
    x = _float_tensor(x, "broadcast_to")
    try:
        np.broadcast_to(x.data, shape)  # a view: costs nothing
    except ValueError:
        raise ValueError(f"broadcast_to: shape {x.shape} cannot broadcast to {shape}") from None
    return x


def _check_embedding(weight, ids) -> tuple[Tensor, np.ndarray]:
    weight = _float_tensor(weight, "embedding", "weight")
    ids = _integers(ids, "embedding", "ids")
    if ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
        raise ValueError(f"embedding: ids must lie in [0, {weight.shape[0]}), "
                         f"got values from {ids.min()} to {ids.max()}")
    return weight, ids


def _check_concat(tensors: list) -> list:
    if not tensors:
        raise ValueError("concat: need at least one tensor")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"concat: all tensors must share one dtype, got {sorted(map(str, dtypes))}")
    return tensors


def _check_split(n: int, sizes) -> list:
    """The piece sizes as a list: `sizes` itself, or n cut into `sizes` equal parts."""
    if isinstance(sizes, int):
        if sizes <= 0 or n % sizes:
            raise ValueError(f"split: cannot cut length {n} into {sizes} equal parts")
        sizes = [n // sizes] * sizes
    if any(size < 0 for size in sizes):
        raise ValueError(f"split: sizes {list(sizes)} must not be negative")
    if builtins.sum(sizes) != n:
        raise ValueError(f"split: sizes {list(sizes)} add to {builtins.sum(sizes)}, not {n}")
    return sizes


def _check_matmul(a, b) -> tuple[Tensor, Tensor]:
    a, b = _pair(a, b, "matmul", broadcast=False)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul: both operands need at least 2 dimensions, got shapes "
                         f"{a.shape} and {b.shape}; reshape vectors to (1, K) or (K, 1)")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: a has shape {a.shape} and b has shape {b.shape}; "
                         f"inner dimensions {a.shape[-1]} and {b.shape[-2]} must match")
    return a, b


def _check_linear(x, w, bias) -> tuple[Tensor, Tensor]:
    x, w = _check_matmul(x, w)
    if w.ndim != 2:
        raise ValueError(f"linear: w must be a matrix (K, N), got shape {w.shape}")
    if bias is None:
        return x, w
    if not isinstance(bias, Tensor):
        raise TypeError(f"linear: bias must be a Tensor or None, got {type(bias).__name__}")
    if bias.shape != (w.shape[1],) or bias.dtype != w.dtype:
        raise ValueError(f"linear: bias must have shape ({w.shape[1]},) and w's dtype {w.dtype}, "
                         f"got {bias.shape} {bias.dtype}")
    return x, w


def _check_cross_entropy(logits, targets, ignore_index: int) -> tuple[Tensor, np.ndarray]:
    logits = _float_tensor(logits, "cross_entropy", "logits")
    targets = _integers(targets, "cross_entropy", "targets")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets have shape {targets.shape} but logits "
                         f"{logits.shape} need targets of shape {logits.shape[:-1]}")
    V, flat = logits.shape[-1], targets.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
    if bad.any():
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) or equal "
                         f"ignore_index={ignore_index}; found {flat[bad][0]}")
    return logits, targets


def _check_layer_norm(x, weight: Tensor, bias: Tensor | None) -> Tensor:
    x = _float_tensor(x, "layer_norm")
    C = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.dtype != x.dtype:
            raise _dtype_mismatch("layer_norm", f"{name} is {param.dtype}", f"x is {x.dtype}")
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"layer_norm: weight and bias must have shape ({C},) for input {x.shape}")
    return x


def _check_dropout_p(p: float, who: str) -> None:
    """A dropout probability must lie in [0, 1) (also used by nn.Dropout, naming itself)."""
    if not 0 <= p < 1:
        raise ValueError(f"{who}: p must be in [0, 1), got {p}")


def _check_square(A: Tensor, op: str) -> Tensor:
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{op}: A must be square (..., n, n), got {A.shape}")
    return A


def _check_solve(A, B) -> tuple[Tensor, Tensor]:
    A, B = _pair(A, B, "solve", broadcast=False)
    _check_square(A, "solve")
    if B.ndim < 2 or B.shape[-2] != A.shape[-1]:
        raise ValueError(f"solve: B must have shape (..., {A.shape[-1]}, k), got {B.shape}")
    return A, B
