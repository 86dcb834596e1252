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

    dbias and dweight sum over every leading axis: dbias = sum grad, dweight = sum grad * xhat.
    Through the normalisation, with dxhat = grad * weight (means over the last axis):
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    (the mean term comes from mu depending on every x_i, the last from var doing so).
    """
    mu = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = (x - mu) * rstd  # (..., C)
    dxhat = grad * weight  # (..., C)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return dx, (grad * xhat).sum(axis=lead), grad.sum(axis=lead)
