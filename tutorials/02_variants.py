"""Lesson 2: fifteen ways to build attention, and what each one costs.

Run: python tutorials/02_variants.py

A code names the projections of (Q, K, V): equal letters share one weight, '-' is no projection
(the role is the input itself). We list the codes, count what they cost, and look at two
consequences: tying K and V halves the KV cache, and tying Q and K makes the attention scores symmetric.
"""

import numpy as np

from minqkv.attention import ALL_CODES, CausalSelfAttention, attend, parse_code
from minqkv.model import GPTConfig
from minqkv.tensor import Tensor, no_grad

print("the", len(ALL_CODES), "codes:", " ".join(ALL_CODES))
print("'shared-kv' is", parse_code("shared-kv"), "and 'no-query' is", parse_code("no-query"))

for code in ["abc", "abb", "aab", "--a", "---"]:
    s = GPTConfig(code=code, n_embd=64, n_head=4, n_layer=1).attention_spec(0)
    print(f"{code}: {s.params():6,} params/layer, {s.kv_cache_floats_per_token():3} cached floats/token,"
          f" symmetric scores: {s.symmetric()}")

# Symmetry: with Q = K, score[i, j] = q_i . k_j = q_j . k_i = score[j, i].
x = Tensor(np.random.default_rng(0).standard_normal((1, 5, 64)))
for code, rotate in [("aab", False), ("aab", True)]:
    config = GPTConfig(code=code, n_embd=64, n_head=4, n_layer=1, rotate=rotate)
    attn = CausalSelfAttention(config.attention_spec(0), dtype=np.float64)
    if rotate:  # move the rotation away from its identity start, as training would
        attn.rotation_param.data[:] = 0.3 * np.random.default_rng(1).standard_normal(attn.rotation_param.shape)
    with no_grad():
        q, k, v = attn.project(x)
        _, scores, _ = attend(q, k, v)
    S = scores.data[0, 0]  # (T, T) of head 0, before the causal mask
    gap = np.abs(S - S.T).max()
    print(f"{code}{'+rotate' if rotate else ''}: max |S - S^T| = {gap:.2e}")
    assert (gap < 1e-12) == (not rotate)
