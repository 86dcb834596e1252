"""Tensor: a NumPy array that remembers how it was made, so gradients can flow back.

Every differentiable op (see ops.py) builds its output with `Tensor.from_op`, handing
over the inputs it read and a small closure that turns the output's gradient into
gradients for those inputs. `Tensor.backward` sorts the graph once, then walks it
backwards calling those closures. That is the whole engine.

Backward reads the inputs as they were when the op ran, so an input edited in place in between
would give a wrong gradient without a word. Two guards refuse that (as PyTorch's version
counters do, and further):

- every Tensor counts the changes to its data in `_version`: assigning `t.data = ...` (also
  `t.data += 1`, which assigns) and writers of the package (AdamW's step, load_state_dict, via
  writable_data()) add one. Each op records its inputs' versions, and backward raises a
  RuntimeError naming the op and the input when one has changed: recompute the forward.
- element writes (`w.data[0] = 5`, `np.copyto(w.data, ...)`) assign nothing, so no counter sees
  them. Instead a Parameter (nn.py: the weights an optimiser and a user edit) is made read-only
  while a graph reads it: from the first op that records it until a backward() over a graph
  holding it ends, or until a writer of the package (writable_data()) opens it. Such a write
  fails at once, with NumPy's "assignment destination is read-only". To edit a weight by hand
  in that window, assign a new array (`w.data = new`), which the counter sees; to run a model
  only for a look, run it under no_grad(), which records no graph and locks nothing.

Limits, plainly: element writes into any other array are not caught (assignments are): a plain
Tensor leaf, even with requires_grad=True, and the output of an op. Locking every leaf would
refuse finite differences taken by hand beside a graph that is never walked (tutorial 02 does
that), and an op's output is the package's own. A Parameter is unlocked when a backward() ends,
so walking the same graph again after element writes is not caught either, and neither is a
write through a view taken before the lock or through the array's base.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import kernels

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


class Tensor:
    """An n-dimensional array with an optional gradient.

    data:          the NumPy array (float32 or float64 for anything differentiable; ints for ids)
    grad:          NumPy array of the same shape, filled by backward(); None until then
    requires_grad: whether backward() should compute a gradient for this tensor
    """

    __array_ufunc__ = None  # so `ndarray * Tensor` defers to Tensor.__rmul__
    _lock_while_read = False  # a Parameter's array is read-only while a graph reads it (see above)

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        data = np.asarray(data, dtype=dtype)
        if requires_grad and data.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"Tensor: requires_grad=True needs float32 or float64 data, got {data.dtype}"
            )
        self._data = data
        self._version = 0  # changes to data: assignments and writable_data() (see the module's docstring)
        self._locked = False  # whether this tensor made its array read-only (a Parameter a graph reads)
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
            out._parent_versions = tuple(p._version for p in parents)
            for p in parents:
                if p._lock_while_read:
                    p._lock()
        return out

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value) -> None:
        if value is not self._data:  # a new array (`t.data += 1` hands back the same one, edited)
            self._data, self._locked = value, False  # the old one stays read-only for the graphs that hold it
        self._version += 1

    def writable_data(self) -> np.ndarray:
        """data opened for an in-place write by its owner (an optimiser step, load_state_dict):
        unlocked, and counted as a change, so a graph recorded before refuses to run backward."""
        self._unlock()
        self._version += 1
        return self._data

    def _lock(self) -> None:
        if not self._locked and self._data.flags.writeable:
            self._data.flags.writeable = False
            self._locked = True

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            try:
                self._data.flags.writeable = True
            except ValueError:  # a view of an array that is read-only itself: it stays so
                pass

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

        grads = {id(self): grad}  # gradients of interior nodes live only during this walk
        order = _topological_order(self)
        try:
            for node in reversed(order):
                g = grads.pop(id(node), None)
                if g is None:
                    continue
                if node._backward is None:  # a leaf: keep its gradient
                    node.grad = g.copy() if node.grad is None else node.grad + g
                    continue
                _check_inputs_unchanged(node)
                for parent, parent_grad in zip(node._parents, node._backward(g)):
                    if parent_grad is None or not parent.requires_grad:
                        continue
                    key = id(parent)
                    grads[key] = parent_grad if key not in grads else sum_of(grads[key], parent_grad)
        finally:
            for node in order:  # the graph is read: its leaves may be written again
                node._unlock()

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


def sum_of(a, b):
    """a + b. Two float arrays of one shape (the residual stream, gradients that meet at a node)
    are added by kernels.add, which shares the pass between threads; anything else (broadcasting,
    0-d arrays, the pieces of a split's gradient) by Python's +."""
    if (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.ndim
            and a.dtype == b.dtype and a.dtype in FLOAT_DTYPES):
        return kernels.add(a, b)
    return a + b


def _check_inputs_unchanged(node: Tensor) -> None:
    """Backward reads the inputs an op saw: refuse when one has changed since (see the module's docstring)."""
    for i, (parent, version) in enumerate(zip(node._parents, node._parent_versions)):
        if parent._version != version:
            made_by = f"the output of '{parent._op}'" if parent._op else "a leaf"
            raise RuntimeError(f"backward: input {i} of '{node._op}' ({made_by}, {parent.dtype} {parent.shape}) "
                               f"was changed in place after '{node._op}' read it (version {version} -> "
                               f"{parent._version}), so its gradient would be wrong; recompute the forward "
                               "after editing, then call backward")


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
