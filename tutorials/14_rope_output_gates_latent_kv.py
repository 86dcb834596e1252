# %% [markdown]
# # Lesson 14: rotary positions, output gates and latent keys and values
#
# Run: `python tutorials/14_rope_output_gates_latent_kv.py` (times: tutorials/README.md). It reads
# and writes no files and draws nothing. Open beside it: `minqkv/attention.py` (`rope`,
# `CausalSelfAttention.project`, `out_gates`, `up_projected`, `forward`, `KVCache`),
# `minqkv/modifiers.py` (the modifiers' table) and `sink_mass` in `minqkv/lab/analysis.py`.
#
# Three designs of today's models, each a modifier in minqkv's grammar: `+rope` turns q and k by
# their position, `+out-gate` scales each head's output by a learned sigmoid, and `+latent-kvR`
# computes K and V from one narrow latent c, which is all the KV cache keeps. For each: what it
# changes in `project` or `forward`, checked by hand, and what it costs in the cache, measured.
# Last, the attention sink that `minqkv analyze` prints, computed by hand.

# %%
import argparse

import numpy as np

from minqkv.attention import ROPE_BASE, rope
from minqkv.lab.analysis import analyze_model, attention_maps, sink_mass, uniform_sink_mass
from minqkv.model import GPT, GPTConfig
from minqkv.modifiers import parse
from minqkv.tensor import Tensor, no_grad

parser = argparse.ArgumentParser(description="Lesson 14: rope, output gates, latent KV")
parser.add_argument("--out", default=None, help="output folder (this lesson draws nothing)")
args, _ = parser.parse_known_args()

V, T, C, H = 13, 16, 32, 4
hd = C // H
rng = np.random.default_rng(14)


def tiny_gpt(label: str) -> GPT:
    """A float64 GPT with its weights jittered, so that zeros and ones hide no mistake."""
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=H, n_embd=C, dtype="float64",
                          **parse(label)))
    jitter = np.random.default_rng(len(label) + 100)
    for _, param in model.named_parameters():
        param.data[:] = param.data + 0.1 * jitter.standard_normal(param.shape)
    return model


ids = rng.integers(0, V, (1, T))  # (B, T)

# %% [markdown]
# ## 1. RoPE: scores that see only the offset
#
# `+rope` drops the position table. Instead `project` turns q and k after the projections: in
# each head the dimensions (2i, 2i+1) are a pair, a point in the plane, turned by the angle
# p theta_i at position p, theta_i = ROPE_BASE^(-2i/hd). Turning both by their own positions,
# the dot product of a query at n and a key at m sees only the angle between them, (n - m)
# theta_i: the score depends on the offset n - m, not on where the pair sits.

# %%


def rope_by_hand(t: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """t (T, hd) one head; row p turned pair by pair by p theta_i."""
    theta = ROPE_BASE ** (-np.arange(0, hd, 2) / hd)  # (hd/2,)
    angle = np.outer(positions, theta)  # (T, hd/2)
    a, b = t[:, 0::2], t[:, 1::2]  # (T, hd/2) each: the pairs' two coordinates
    turned = np.empty_like(t)
    turned[:, 0::2] = a * np.cos(angle) - b * np.sin(angle)
    turned[:, 1::2] = a * np.sin(angle) + b * np.cos(angle)
    return turned


q, k = rng.standard_normal((1, hd)), rng.standard_normal((1, hd))  # one query and one key vector
positions = np.arange(T)
with no_grad():
    turned = rope(Tensor(np.repeat(q, T, 0)[None]), positions, hd).data[0]  # (T, hd)
assert np.allclose(turned, rope_by_hand(np.repeat(q, T, 0), positions), rtol=0, atol=1e-12)
# score of the same q at n and the same k at m, for every n, m
S = rope_by_hand(np.repeat(q, T, 0), positions) @ rope_by_hand(np.repeat(k, T, 0), positions).T  # (T, T)
offsets_constant = all(np.allclose(np.diagonal(S, d), np.diagonal(S, d)[0], rtol=0, atol=1e-10)
                       for d in range(-T + 1, T))
print(f"rope by hand == attention.rope; S(n, m) depends on n - m only: {offsets_constant}")
print("score against the offset n - m:", np.round([S[n, 0] for n in range(6)], 3))
assert offsets_constant
assert np.allclose(np.linalg.norm(turned, axis=1), np.linalg.norm(q))  # a turn keeps the length

# %% [markdown]
# ## 2. Output gates: a sigmoid per head and token
#
# `+out-gate` adds W_g (C, H); in `forward`, after attention and before W_o, head h of token t is
# multiplied by sigmoid(x_t W_g)_h. W_g starts at zero, so every gate starts at exactly 1/2. A
# head that has nothing to add for a token can now shut (gate near 0) instead of attending
# somewhere harmless. By hand from the model's weights, against `block.attn(x)`:

# %%
gated = tiny_gpt("abc+out-gate")
attn = gated.blocks[0].attn
x = rng.standard_normal((1, T, C))
with no_grad():
    gates = attn.out_gates(Tensor(x)).data  # (B, T, H)
    q_, k_, v_ = (t.data for t in attn.project(Tensor(x)))  # (B, H, T, hd) each
    y_minqkv = attn(Tensor(x)).data
future = np.triu(np.ones((T, T), dtype=bool), k=1)
scores = np.where(future, -np.inf, q_ @ np.swapaxes(k_, -1, -2) / np.sqrt(hd))  # (B, H, T, T)
weights = np.exp(scores - scores.max(-1, keepdims=True))
weights /= weights.sum(-1, keepdims=True)
heads = weights @ v_  # (B, H, T, hd)
sig = 1 / (1 + np.exp(-(x @ attn.w_out_gate.data)))  # (B, T, H)
y_by_hand = (np.swapaxes(heads, 1, 2) * sig[..., None]).reshape(1, T, C) @ attn.w_o.data  # (B, T, C)
print(f"out-gate by hand vs minqkv: max difference {np.abs(y_by_hand - y_minqkv).max():.1e}")
assert np.allclose(gates, sig, rtol=0, atol=1e-12)
assert np.allclose(y_by_hand, y_minqkv, rtol=0, atol=1e-10)
fresh = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=H, n_embd=C, out_gate=True))
with no_grad():
    assert np.all(fresh.blocks[0].attn.out_gates(Tensor(x.astype(np.float32))).data == 0.5)

# %% [markdown]
# ## 3. Latent keys and values
#
# `+latent-kvR` adds W_down (C, R) and replaces W_k, W_v by up-projections (R, width): `project`
# computes c = x W_down, then k = c W_k_up and v = c W_v_up. The cache stores c, R floats per
# token, and every step up-projects all cached latents again (more FLOPs, less memory).

# %%
R = 8
latent = tiny_gpt(f"abc+latent-kv{R}")
attn = latent.blocks[0].attn
with no_grad():
    _, k_minqkv, v_minqkv = (t.data for t in attn.project(Tensor(x)))  # (B, H, T, hd)
c = x @ attn.w_kv_down.data  # (B, T, C) @ (C, R) -> (B, T, R)
k_by_hand = (c @ attn.w_k_up.data).reshape(1, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
v_by_hand = (c @ attn.w_v_up.data).reshape(1, T, H, hd).transpose(0, 2, 1, 3)
print("latent layer's weights:", {n: p.shape for n, p in attn.named_parameters()})
assert np.allclose(k_by_hand, k_minqkv, rtol=0, atol=1e-12) and np.allclose(v_by_hand, v_minqkv, rtol=0, atol=1e-12)

# %% [markdown]
# ## 4. What each costs in the KV cache, measured
#
# `spec.kv_cache_floats_per_token()` is the formula: K and V widths, a tensor serving both
# once, or a latent's R. We decode T tokens one at a time with `model.new_caches()` and count
# the bytes the caches really hold for those tokens (`k_source` and `v_source`, views of the
# buffers, which `KVCache` grows by doubling, so a buffer may reserve up to twice that),
# against formula x layers x tokens x 8 bytes (float64). The
# decoded logits must equal the full forward's. Note `abb+rope`: rope turns K but not V, so the
# shared tensor of `abb` becomes two, and its saving is gone.

# %%
labels = ["abc", "abc+rope", "abc+out-gate", f"abc+latent-kv{R}", "abb", "abb+rope"]
print(f"{'label':16} formula/token/layer   measured bytes   formula bytes")
costs = {}
for label in labels:
    model = tiny_gpt(label)
    caches = model.new_caches()
    with no_grad(), model.evaluating():
        full, _ = model(ids)  # (1, T, V)
        steps = [model(ids[:, t:t + 1], caches=caches)[0].data for t in range(T)]
    assert np.allclose(np.concatenate(steps, axis=1), full.data, rtol=0, atol=1e-9), label
    measured = sum(cache.k_source.nbytes + (cache.v_source.nbytes if cache.v_source is not None else 0)
                   for cache in caches)
    per_token = model.blocks[0].attn.spec.kv_cache_floats_per_token()
    formula = per_token * len(model.blocks) * T * 8
    costs[label] = (per_token, measured, formula)
    print(f"{label:16} {per_token:10}            {measured:10}      {formula:10}")
    assert measured == formula, label
assert costs["abc+rope"][0] == costs["abc"][0] == costs["abc+out-gate"][0] == 2 * C
assert costs[f"abc+latent-kv{R}"][0] == R and costs["abb"][0] == C and costs["abb+rope"][0] == 2 * C

# %% [markdown]
# ## 5. The attention sink
#
# Trained models often park attention they do not need on position 0, the "sink". `minqkv
# analyze` prints `sink_mass`: the mean weight on key 0 over every query after position 0 (query
# 0 can only see itself), beside `uniform_sink_mass`, what evenly spread attention would give:
# query t sees t + 1 keys, so 1/(t + 1), averaged over t = 1 .. T-1. Output gates are one way
# to need no sink: a head can shut instead. By hand, from scores computed with `project`:

# %%
model = tiny_gpt("abc")
with no_grad(), model.evaluating():
    h = model.embed(ids)
    attn_input = model.blocks[0].ln_1(h)
    q0, k0, _ = (t.data for t in model.blocks[0].attn.project(attn_input))
s0 = np.where(future, -np.inf, q0 @ np.swapaxes(k0, -1, -2) / np.sqrt(hd))  # (B, H, T, T)
w0 = np.exp(s0 - s0.max(-1, keepdims=True))
w0 /= w0.sum(-1, keepdims=True)
sink_by_hand = float(w0[..., 1:, 0].mean())
uniform_by_hand = float(np.mean([1 / (t + 1) for t in range(1, T)]))
maps_weights = attention_maps(model, ids)[0][1]
report = analyze_model(model, [(ids, ids)])
print(f"layer 0 sink mass: by hand {sink_by_hand:.6f}, sink_mass {sink_mass(maps_weights):.6f}, "
      f"analyze {report['layers'][0]['sink_mass']:.6f}; uniform {uniform_by_hand:.6f}")
assert np.isclose(sink_by_hand, sink_mass(maps_weights), rtol=0, atol=1e-12)
assert np.isclose(sink_by_hand, report["layers"][0]["sink_mass"], rtol=0, atol=1e-12)
assert np.isclose(uniform_by_hand, uniform_sink_mass(T)) and np.isclose(uniform_by_hand,
                                                                        report["layers"][0]["uniform_sink_mass"])

# %% [markdown]
# An untrained model's attention is nearly even, so its sink mass sits near the uniform
# figure; a trained one that parks attention on token 0 reads well above it. Compare a run with
# and without `+out-gate` using `minqkv analyze --out RUN`.
#
# **What you learned:** RoPE turns q and k pair by pair so scores see only n - m, and under it K
# and V are two tensors in the cache; an output gate scales each head by sigmoid(x W_g), 1/2 at
# the start, and costs no cache; a latent layer caches c = x W_down, R floats a token instead of
# 2 C, and up-projects K and V from it; the cache bytes measured after decoding equal the
# formula; and the sink mass is the mean weight on key 0, read against 1/(t + 1) averaged.

# %%
assert offsets_constant
assert np.allclose(y_by_hand, y_minqkv, rtol=0, atol=1e-10)
assert all(measured == formula for _, measured, formula in costs.values())
assert np.isclose(sink_by_hand, report["layers"][0]["sink_mass"], rtol=0, atol=1e-12)
print("lesson 14 done")
