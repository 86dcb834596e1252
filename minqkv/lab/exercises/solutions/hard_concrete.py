"""Exercise hard_concrete: the gate that ends exactly open or shut (Louizos, Welling & Kingma 2018).

A gate mixes a projection with the identity, z (x W) + (1 - z) x. Its z comes from a learned
log-odds log_alpha: a sigmoid, stretched a little beyond (0, 1) and clipped back, so it can be
exactly 0 or exactly 1. In training, logistic noise makes it a random draw. Build it from
minqkv's differentiable ops so its gradient with respect to log_alpha comes for free.
"""

import numpy as np

from minqkv import ops
from minqkv.tensor import Tensor

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # temperature, and the stretch to (GAMMA, ZETA)


def hard_concrete(log_alpha: Tensor, noise: np.ndarray | None = None) -> Tensor:
    """log_alpha (n,) Tensor, noise (n,) uniform in (0, 1) or None -> z (n,) Tensor in [0, 1].

    without noise:  s = sigmoid(log_alpha)
    with noise u:   s = sigmoid((log_alpha + log u - log(1 - u)) / BETA)
    then:           z = clip(s (ZETA - GAMMA) + GAMMA, 0, 1)
    Use ops.sigmoid and ops.clip (and Tensor arithmetic) so the gradient flows to log_alpha.
    """
    if noise is None:
        s = ops.sigmoid(log_alpha)
    else:
        logistic = np.log(noise) - np.log1p(-noise)  # a logistic sample from a uniform one
        s = ops.sigmoid((log_alpha + logistic.astype(log_alpha.dtype)) * (1.0 / BETA))
    return ops.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
