"""Exercise mul_backward: the gradient of an elementwise product that broadcasts.

out = a * b, where a and b broadcast like NumPy arrays (a (3, 1) times b (4,) gives (3, 4)).
Given grad = dL/dout, return dL/da and dL/db, each of the shape of its input.
"""

import numpy as np


def sum_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Undo broadcasting: sum grad over the axes that broadcasting added or stretched from 1."""
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra)))  # axes broadcasting added in front
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True)  # axes stretched from 1


def mul_backward(a: np.ndarray, b: np.ndarray, grad: np.ndarray) -> tuple:
    """a (shape_a), b (shape_b), grad (broadcast shape) -> (da (shape_a), db (shape_b)).

    d(a*b)/da = b, d(a*b)/db = a: da = grad * b and db = grad * a, each summed back down to its
    input's shape (an element of a that was used for several outputs gets all their gradients).
    """
    da = sum_to_shape(grad * b, np.shape(a))
    db = sum_to_shape(grad * a, np.shape(b))
    return da, db
