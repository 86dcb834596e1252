"""Lesson 2: fifteen ways to build attention, and what each one costs.

Run: python tutorials/02_variants.py

A variant is a code for (Q, K, V): equal letters share one weight, '-' is no projection.
We list the codes, count what they cost, and look at two consequences:
tying K and V halves the KV cache, and tying Q and K makes the attention scores symmetric.
"""

import numpy as np

from minqkv.attention import ALL_CODES, AttentionShape, CausalSelfAttention, parse_variant
from minqkv.tensor import Tensor

print("the", len(ALL_CODES), "codes:", " ".join(ALL_CODES))
print("'shared-kv' is", parse_variant("shared-kv"), "and 'no-query' is", parse_variant("no-query"))

for code in ["abc", "abb", "aab", "--a", "---"]:
    s = AttentionShape(code=code, n_embd=64, n_head=4)
    print(f"{code}: {s.params():6,} params/layer, {s.kv_cache_floats_per_token():3} cached floats/token,"
          f" symmetric scores: {s.symmetric()}")

# Symmetry: with Q = K, score[i, j] = q_i . k_j = q_j . k_i = score[j, i].
x = Tensor(np.random.default_rng(0).standard_normal((1, 5, 64)))
for code, rotate in [("aab", False), ("aab", True)]:
    attn = CausalSelfAttention(AttentionShape(code=code, n_embd=64, n_head=4, rotate=rotate),
                               dtype=np.float64)
    if rotate:  # move the rotation away from its identity start, as training would
        attn.rotation_param.data[:] = 0.3 * np.random.default_rng(1).standard_normal(attn.rotation_param.shape)
    scores = attn.attention_scores(x)[0, 0]  # (T, T) of head 0
    gap = np.abs(scores - scores.T).max()
    print(f"{code}{'+rotate' if rotate else ''}: max |S - S^T| = {gap:.2e}")
