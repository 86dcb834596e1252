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

    Differentiate -log softmax(logits)[t] with respect to each logit of its row: the log and
    the exp cancel into something short. Then remember the mean, and the ignored rows.
    """
    raise NotImplementedError("your code here")
