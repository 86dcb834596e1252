"""Exercise matmul_backward: the gradient of a matrix product.

out = a @ b for a (M, K) and b (K, N), out (M, N). Given grad = dL/dout (M, N), return
dL/da (M, K) and dL/db (K, N).
"""

import numpy as np


def matmul_backward(a: np.ndarray, b: np.ndarray, grad: np.ndarray) -> tuple:
    """a (M, K), b (K, N), grad (M, N) -> (da (M, K), db (K, N)).

    out[m, n] = sum_k a[m, k] b[k, n]. Write dL/da[m, k] as a sum over n, then as one product.
    """
    raise NotImplementedError("your code here")
