"""The input checks of the ops in ops.py, kept out of the way of their math.

Each returns an op's inputs in the form the op uses (Tensors of one dtype, a tuple of axes, a list
of sizes) or raises an error that names the op and the argument and says what was wrong. These
are the checks a user of the ops needs: Tensors and their dtypes, the op's own shapes, and values
(ids inside the table, targets inside the vocabulary, an eps >= 0). The kernels under the ops check
only what their arrays must be for C (their errors name the same arguments), and no op repeats
those checks here.
"""

from __future__ import annotations

import builtins

import numpy as np

from .tensor import FLOAT_DTYPES, Tensor


def as_pair(a, b, op: str, broadcast: bool = True) -> tuple[Tensor, Tensor]:
    """Turn the operands of a binary op into two Tensors of one float dtype."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError(f"{op}: at least one operand must be a Tensor, got {type(a).__name__} and "
                        f"{type(b).__name__}; numbers and arrays take the dtype of the "
                        "Tensor they meet, so wrap one first, e.g. Tensor(np.float64(1.0))")
    like = a if isinstance(a, Tensor) else b
    a, b = as_tensor(a, like, op, "a"), as_tensor(b, like, op, "b")
    if broadcast:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ValueError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast "
                             "(trailing dimensions must be equal or 1)") from None
    return a, b


def as_tensor(x, like: Tensor, op: str, name: str) -> Tensor:
    if isinstance(x, Tensor):
        if x.dtype != like.dtype:
            raise dtype_mismatch(op, f"{name} is {x.dtype}", f"the other operand is {like.dtype}")
        return x
    array = np.asarray(x)
    if array.dtype in FLOAT_DTYPES and array.ndim > 0 and array.dtype != like.dtype:
        raise dtype_mismatch(op, f"{name} is a {array.dtype} array", f"the tensor is {like.dtype}")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{op}: {name} must be a number, a numeric array or a Tensor, "
                        f"got {type(x).__name__}")
    return Tensor(array.astype(like.dtype, copy=False))


def dtype_mismatch(op: str, this: str, other: str) -> TypeError:
    return TypeError(f"{op}: {this} but {other}; dtypes never change silently, convert one explicitly")


def tensor_input(x, op: str, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, op: str, name: str = "x") -> Tensor:
    tensor_input(x, op, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {x.dtype}")
    return x


def integers(x, op: str, name: str) -> np.ndarray:
    """The integer array in x (a Tensor, an array or a list)."""
    array = x.data if isinstance(x, Tensor) else np.asarray(x)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{op}: {name} must be integers, got {array.dtype}")
    return array


def is_basic_index(index) -> bool:
    """Whether an index only slices and picks (ints, slices, ..., None): no element twice."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(part, (slice, int, np.integer)) or part is Ellipsis or part is None
               for part in parts)


def check_pow(x, exponent) -> Tensor:
    x = float_tensor(x, "pow")
    if not isinstance(exponent, (int, float)) or isinstance(exponent, bool):
        raise TypeError(f"pow: exponent must be a Python number, got {type(exponent).__name__}")
    return x


def check_reduction(x, axis, op: str, nonempty: bool = False) -> tuple[Tensor, tuple]:
    """x and its reduced axes as a tuple of non-negative ints (all axes for axis=None).

    As in PyTorch, a 0-d tensor takes axis 0 or -1 as if it had one axis of length 1: the result
    is the tensor itself (no axis is left to reduce)."""
    x = float_tensor(x, op)
    every_axis = tuple(range(x.ndim))
    axes = every_axis if axis is None else (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if axes == () and x.ndim:
        raise ValueError(f"{op}: axis=() reduces no axis in NumPy but every axis in PyTorch; "
                         "pass axis=None to reduce them all")
    ndim = max(x.ndim, 1)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{op}: axis {a} is out of range for a tensor with {x.ndim} dimensions")
    axes = tuple(a % ndim for a in axes) if x.ndim else ()
    if nonempty and any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"{op}: cannot average over an empty axis (shape {x.shape})")
    return x, axes


def reshaped(x: Tensor, shape: tuple) -> np.ndarray:
    """x's data in the new shape; NumPy's own rules decide what fits, the error names the op."""
    try:
        return x.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {x.shape} "
                         f"({x.size} elements) into {shape}") from None


def check_axis(axis: int, ndim: int, op: str, name: str = "axis") -> int:
    """axis as a non-negative int, or an error naming it and the tensor's number of dimensions."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{op}: {name} {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def check_permutation(axes: tuple, ndim: int) -> None:
    in_range = all(-ndim <= a < ndim for a in axes)
    if not in_range or sorted(a % ndim for a in axes) != list(range(ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of {ndim} axes")


def check_embedding(weight, ids) -> tuple[Tensor, np.ndarray]:
    weight = float_tensor(weight, "embedding", "weight")
    ids = integers(ids, "embedding", "ids")
    if ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
        raise ValueError(f"embedding: ids must lie in [0, {weight.shape[0]}), "
                         f"got values from {ids.min()} to {ids.max()}")
    return weight, ids


def check_concat(tensors: list) -> list:
    if not tensors:
        raise ValueError("concat: need at least one tensor")
    for i, t in enumerate(tensors):
        tensor_input(t, "concat", f"tensors[{i}]")
    if tensors[0].ndim == 0:
        raise ValueError("concat: 0-d tensors have no axis to join along; reshape them to (1,) first")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"concat: all tensors must share one dtype, got {sorted(map(str, dtypes))}")
    return tensors


def check_split(n: int, sizes) -> list:
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


def check_matmul(a, b) -> tuple[Tensor, Tensor]:
    a, b = as_pair(a, b, "matmul", broadcast=False)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul: both operands need at least 2 dimensions, got shapes "
                         f"{a.shape} and {b.shape}; reshape vectors to (1, K) or (K, 1)")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: a has shape {a.shape} and b has shape {b.shape}; "
                         f"inner dimensions {a.shape[-1]} and {b.shape[-2]} must match")
    return a, b


def check_matmul_each(x, weights: list) -> tuple[Tensor, list]:
    x = float_tensor(x, "matmul_each")
    if x.ndim < 2:
        raise ValueError(f"matmul_each: x has shape {x.shape} but needs at least 2 dimensions (..., M, K)")
    for i, w in enumerate(weights):
        w = float_tensor(w, "matmul_each", f"weights[{i}]")
        if w.dtype != x.dtype:
            raise dtype_mismatch("matmul_each", f"weights[{i}] is {w.dtype}", f"x is {x.dtype}")
        if w.ndim != 2 or w.shape[0] != x.shape[-1]:
            raise ValueError(f"matmul_each: weights[{i}] has shape {w.shape} but x {x.shape} needs "
                             f"a matrix ({x.shape[-1]}, N)")
    return x, list(weights)


def check_linear(x, w, bias) -> tuple[Tensor, Tensor]:
    x, w = check_matmul(x, w)
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


def check_cross_entropy(logits, targets, ignore_index: int) -> tuple[Tensor, np.ndarray]:
    logits = float_tensor(logits, "cross_entropy", "logits")
    targets = integers(targets, "cross_entropy", "targets")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets have shape {targets.shape} but logits "
                         f"{logits.shape} need targets of shape {logits.shape[:-1]}")
    V, flat = logits.shape[-1], targets.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
    if bad.any():
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) or equal "
                         f"ignore_index={ignore_index}; found {flat[bad][0]}")
    return logits, targets


def check_layer_norm(x, weight, bias, eps: float) -> Tensor:
    """Tensors and eps; their shapes and dtypes are the kernel's check (by the same names)."""
    x = float_tensor(x, "layer_norm")
    float_tensor(weight, "layer_norm", "weight")
    if bias is not None:
        float_tensor(bias, "layer_norm", "bias")
    if not eps >= 0:
        raise ValueError(f"layer_norm: eps must be >= 0, got {eps}")
    return x


def check_window(window) -> int:
    """causal_attention's window: None or 0 (every earlier key) or a whole number W >= 1 -> the
    kernels' int (0 for none)."""
    if window is None:
        return 0
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"causal_attention: window must be None, 0 (no window) or a whole number >= 1 (the keys each "
                         f"query sees, itself included), got {window!r}")
    return int(window)


def check_dropout_p(p: float, op: str) -> None:
    """A dropout probability lies in [0, 1); nn.Dropout checks its p with this too, at construction."""
    if not 0 <= p < 1:
        raise ValueError(f"{op}: p must be in [0, 1), got {p}")


def check_solve(A, B) -> tuple[Tensor, Tensor]:
    A, B = as_pair(A, B, "solve", broadcast=False)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"solve: A must be square (..., n, n), got {A.shape}")
    if B.ndim < 2 or B.shape[-2] != A.shape[-1]:
        raise ValueError(f"solve: B must have shape (..., {A.shape[-1]}, k), got {B.shape}")
    return A, B
