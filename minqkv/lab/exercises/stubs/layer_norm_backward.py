"""Exercise layer_norm_backward: the gradient of layer norm.

Over the last axis of x (..., C): mean mu, variance var, rstd = 1 / sqrt(var + eps),
xhat = (x - mu) * rstd, y = xhat * weight + bias. Given grad = dL/dy, return dL/dx,
dL/dweight and dL/dbias.
"""

import numpy as np


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """The forward pass, given: x (..., C), weight and bias (C,) -> y (..., C)."""
    mu = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    return (x - mu) * rstd * weight + bias


def layer_norm_backward(x: np.ndarray, weight: np.ndarray, grad: np.ndarray, eps: float = 1e-5) -> tuple:
    """x (..., C), weight (C,), grad (..., C) -> (dx (..., C), dweight (C,), dbias (C,)).

    weight and bias are used at every position, so their gradients sum over every leading axis.
    For dx, remember that mu and var each depend on every x_i of the row, not only on x_j.
    """
    raise NotImplementedError("your code here")
