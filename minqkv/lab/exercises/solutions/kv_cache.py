"""Exercise kv_cache: the KV cache's append, into a buffer that grows by doubling.

In decoding, each step adds a token's key and value sources (B, 1, width) to those of the past
tokens. Concatenating copies the whole past every step (O(n^2) copying for n tokens). Instead,
keep a buffer (B, capacity, width) with room to spare: write the new tokens after the past ones,
and only when the buffer is full, replace it by one twice as large (copying the past once).
"""

import numpy as np


class KVCache:
    """Cached key and value sources of past tokens. A tensor used as both K and V (code 'abb')
    is cached once: append(k_new, None) then keeps no values."""

    def __init__(self):
        self._k = None  # (B, capacity, width_k) buffer, or None before the first append
        self._v = None  # (B, capacity, width_v) buffer, or None (no values cached)
        self.length = 0  # how many positions of the buffers hold tokens

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[1]

    @property
    def k_source(self):
        """(B, length, width_k): a view of the cached keys."""
        return None if self._k is None else self._k[:, :self.length]

    @property
    def v_source(self):
        """(B, length, width_v): a view of the cached values, or None."""
        return None if self._v is None else self._v[:, :self.length]

    def append(self, k_new: np.ndarray, v_new: np.ndarray | None) -> tuple:
        """k_new (B, T, width_k), v_new (B, T, width_v) or None -> (k_source, v_source), views.

        Write the T new positions at length .. length + T - 1. A buffer too short is replaced
        by one of max(length + T, 2 * capacity) positions holding the past tokens. Views handed
        out earlier must keep their values: never write below `length`.
        """
        self._k = _written(self._k, k_new, self.length)
        if v_new is not None:
            self._v = _written(self._v, v_new, self.length)
        self.length += k_new.shape[1]
        return self.k_source, self.v_source


def _written(buffer, new: np.ndarray, start: int) -> np.ndarray:
    """buffer (B, capacity, width) or None, with new (B, T, width) written at start .. start + T."""
    end = start + new.shape[1]
    if buffer is None or end > buffer.shape[1]:
        capacity = max(end, 2 * (0 if buffer is None else buffer.shape[1]))
        grown = np.empty((new.shape[0], capacity, new.shape[2]), new.dtype)
        if buffer is not None:
            grown[:, :start] = buffer[:, :start]  # the past, copied once per doubling
        buffer = grown
    buffer[:, start:end] = new
    return buffer
