"""Exercise cross_entropy_backward: the gradient of the loss, fused with its softmax.

The loss of a language model is the mean, over the positions that count, of -log p[target],
where p = softmax(logits) over the vocabulary. A position whose target is ignore_index (padding)
does not count. Given grad = dL/dloss (a number), return dL/dlogits.
"""

import numpy as np


def cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -1) -> float:
    """The forward pass, given: logits (..., V), targets (...) ints -> the mean loss over counted positions."""
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (N, V), (N,)
    counted = flat_targets != ignore_index  # (N,)
    shifted = flat - flat.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (N, V)
    return -log_probs[counted, flat_targets[counted]].sum() / max(counted.sum(), 1)


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray, grad, ignore_index: int = -1) -> np.ndarray:
    """logits (..., V), targets (...) ints, grad a number -> dlogits (..., V).

    On a counted row, d(-log p[t])/dlogits = p - onehot(t): softmax and log cancel into one
    subtraction. The mean divides by the count; ignored rows get 0.
    """
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (N, V), (N,)
    counted = flat_targets != ignore_index  # (N,)
    p = np.exp(flat - flat.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # (N, V)
    rows = np.flatnonzero(counted)
    p[rows, flat_targets[rows]] -= 1.0  # p - onehot(target)
    p[~counted] = 0.0
    return (grad * p / max(counted.sum(), 1)).reshape(logits.shape)
