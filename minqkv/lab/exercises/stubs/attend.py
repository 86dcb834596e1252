"""Exercise attend: causal attention, the part every projection variant shares.

Queries q (B, H, T, hd) attend over keys k and values v (B, Hkv, Tk, hd). H is a multiple of
Hkv: query head h reads key/value head h // (H // Hkv) (grouped-query attention; Hkv = H is the
usual multi-head case). Tk >= T: the last T positions are the queries' own (the ones before
are cached past tokens), so query i sits at position Tk - T + i and sees keys 0 .. Tk - T + i.
"""

import numpy as np


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q (B, H, T, hd), k and v (B, Hkv, Tk, hd) -> y (B, T, H * hd), the heads side by side.

    scores = q k^T / sqrt(hd)                 (B, H, T, Tk)
    scores[.., i, j] = -inf where j > Tk - T + i   (the causal mask)
    weights = softmax(scores) over the keys   (B, H, T, Tk)
    y = weights v                             (B, H, T, hd), then heads merged: (B, T, H * hd)
    """
    raise NotImplementedError("your code here")
