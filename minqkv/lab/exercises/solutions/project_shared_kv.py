"""Exercise project_shared_kv: the 'abb' variant's projection, keys and values tied.

Code 'abb' (shared-kv): Q uses one matrix W_a, and K and V share one matrix W_b, applied once:
q = x W_a, k = v = x W_b. Each is then split into heads of width hd = C / n_head. With grouped
keys and values (n_kv_head < n_head) W_b is narrower: (C, n_kv_head * hd).
"""

import numpy as np


def split_heads(t: np.ndarray, n: int) -> np.ndarray:
    """t (B, T, n * hd) -> (B, n, T, hd): head h is channels h*hd .. (h+1)*hd - 1."""
    B, T, width = t.shape
    return t.reshape(B, T, n, width // n).transpose(0, 2, 1, 3)


def project_shared_kv(x: np.ndarray, w_a: np.ndarray, w_b: np.ndarray, n_head: int,
                      n_kv_head: int | None = None) -> tuple:
    """x (B, T, C), w_a (C, C), w_b (C, n_kv_head * hd) -> q (B, n_head, T, hd), k and v (B, n_kv_head, T, hd).

    One product for K and V (that is the point of tying them: one matrix, one cache); k and v
    are the same array.
    """
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    q = split_heads(x @ w_a, n_head)  # (B, T, C) @ (C, C) -> (B, T, C) -> (B, H, T, hd)
    k = split_heads(x @ w_b, n_kv_head)  # (B, T, C) @ (C, Hkv*hd) -> (B, Hkv, T, hd)
    return q, k, k
