"""Tensor: a NumPy array that remembers how it was made, so gradients can flow back.

Every differentiable op (see ops.py) builds its output with `Tensor.from_op`, handing
over the inputs it read and a small closure that turns the output's gradient into
gradients for those inputs. `Tensor.backward` sorts the graph once, then walks it
backwards calling those closures. That is the whole engine.
"""

from __future__ import annotations

import contextlib

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block ops record no graph: for evaluation, sampling and optimiser steps."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


_walk = 0  # backward() walks so far: ops whose outputs share one gradient array tell walks apart by it


def backward_walk() -> int:
    """The number of the backward walk running now (or the last one)."""
    return _walk


class Tensor:
    """An n-dimensional array with an optional gradient.

    data:          the NumPy array (float32 or float64 for anything differentiable; ints for ids)
    grad:          NumPy array of the same shape, filled by backward(); None until then
    requires_grad: whether backward() should compute a gradient for this tensor
    """

    __array_ufunc__ = None  # so `ndarray * Tensor` defers to Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        data = np.asarray(data, dtype=dtype)
        if requires_grad and data.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"Tensor: requires_grad=True needs float32 or float64 data, got {data.dtype}"
            )
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._parents: tuple[Tensor, ...] = ()
        self._backward = None  # closure: grad of output -> tuple of grads for _parents
        self._op = ""

    @classmethod
    def from_op(cls, data: np.ndarray, parents: tuple, backward, op: str) -> "Tensor":
        """Wrap an op's result; keep the graph only when some input needs a gradient."""
        out = cls(data)
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = parents
            out._backward = backward
            out._op = op
        return out

    # Array-like facts.
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same values, cut off from the graph (shares memory with self)."""
        return Tensor(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    # Reverse mode.
    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf) into .grad of every leaf that requires a gradient.

        grad defaults to 1 for a scalar output; a non-scalar output needs it given.
        """
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require a gradient "
                               "(no input had requires_grad=True, or it was made under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward: output has shape {self.shape}; pass grad= "
                                 "for a non-scalar output")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"backward: grad has shape {grad.shape}, expected {self.shape}")

        global _walk
        _walk += 1
        grads = {id(self): grad}  # gradients of interior nodes live only during this walk
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:  # a leaf: keep its gradient
                node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            for parent, parent_grad in zip(node._parents, node._backward(g)):
                if parent_grad is None or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad

    def zero_grad(self) -> None:
        self.grad = None

    # Operators: thin aliases for ops.py.
    def __add__(self, other):
        return _ops().add(self, other)

    def __radd__(self, other):
        return _ops().add(other, self)

    def __sub__(self, other):
        return _ops().sub(self, other)

    def __rsub__(self, other):
        return _ops().sub(other, self)

    def __mul__(self, other):
        return _ops().mul(self, other)

    def __rmul__(self, other):
        return _ops().mul(other, self)

    def __truediv__(self, other):
        return _ops().div(self, other)

    def __rtruediv__(self, other):
        return _ops().div(other, self)

    def __neg__(self):
        return _ops().neg(self)

    def __pow__(self, exponent):
        return _ops().pow(self, exponent)

    def __matmul__(self, other):
        return _ops().matmul(self, other)

    def __rmatmul__(self, other):
        return _ops().matmul(other, self)

    def __getitem__(self, index):
        return _ops().getitem(self, index)

    def sum(self, axis=None, keepdims=False):
        return _ops().sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops().mean(self, axis, keepdims)

    def reshape(self, *shape):
        return _ops().reshape(self, *shape)

    def transpose(self, *axes):
        return _ops().transpose(self, *axes)

    def exp(self):
        return _ops().exp(self)

    def log(self):
        return _ops().log(self)


def _topological_order(root: Tensor) -> list:
    """Nodes so that every node comes after its parents (iterative DFS: deep graphs are fine)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


def _ops():
    # ops.py imports this module, so the operator aliases import it lazily.
    from . import ops
    return ops
