"""Exercise matmul_backward: the gradient of a matrix product.

out = a @ b for a (M, K) and b (K, N), out (M, N). Given grad = dL/dout (M, N), return
dL/da (M, K) and dL/db (K, N).
"""

import numpy as np


def matmul_backward(a: np.ndarray, b: np.ndarray, grad: np.ndarray) -> tuple:
    """a (M, K), b (K, N), grad (M, N) -> (da (M, K), db (K, N)).

    out[m, n] = sum_k a[m, k] b[k, n], so dL/da[m, k] = sum_n grad[m, n] b[k, n] and
    dL/db[k, n] = sum_m a[m, k] grad[m, n]: da = grad b^T, db = a^T grad. (Check the shapes:
    (M, N) @ (N, K) is (M, K); (K, M) @ (M, N) is (K, N). The shapes alone nearly give the answer.)
    """
    da = grad @ b.T  # (M, N) @ (N, K) -> (M, K)
    db = a.T @ grad  # (K, M) @ (M, N) -> (K, N)
    return da, db
