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

    Start from one row's Jacobian dy_i/dx_j (differentiate exp(x_i) / sum_j exp(x_j) for i = j
    and for i != j), then dx_j = sum_i grad_i dy_i/dx_j. No (N, N) matrix is needed in the end.
    """
    raise NotImplementedError("your code here")
