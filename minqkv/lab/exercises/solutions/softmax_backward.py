"""Exercise softmax_backward: the gradient of softmax over the last axis.

y = softmax(x), y_i = exp(x_i) / sum_j exp(x_j) along the last axis. Given y (not x: the
forward pass keeps its output) and grad = dL/dy, return dL/dx.
"""

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    """The forward pass, given: subtract each row's max first so exp never overflows."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(y: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """y (..., N) = softmax(x), grad (..., N) -> dx (..., N).

    dy_i/dx_j = y_i (delta_ij - y_j) (the Jacobian of one row), so
    dx_j = sum_i grad_i y_i (delta_ij - y_j) = y_j (grad_j - sum_i grad_i y_i).
    """
    return y * (grad - (grad * y).sum(axis=-1, keepdims=True))
