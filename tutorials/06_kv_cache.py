# %% [markdown]
# # Lesson 6: the KV cache, and the variants that shrink it
#
# Run: `python tutorials/06_kv_cache.py [--out FOLDER]` (times: tutorials/README.md). Draws
# `06_kv_cache.png`.
#
# A language model writes one token at a time, and each new token attends to all the tokens
# before it. Recomputing the whole sequence for every new token would repeat almost all the
# work. This lesson shows the standard fix, the **KV cache**, checks that it changes no number,
# and then looks at its price in memory, which is what sharing K and V (`abb`) and using fewer
# key/value heads (GQA, MQA) reduce.

# %%
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from minqkv.attention import attend
from minqkv.model import GPT, GPTConfig
from minqkv.tensor import Tensor, no_grad
from minqkv.lab.variants import preset_rows

parser = argparse.ArgumentParser(description="Lesson 6: the KV cache")
parser.add_argument("--out", default=None, help="folder for the PNG (default: a temporary folder)")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson06-"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Why a cache is possible
#
# Because of the causal mask (lesson 4), the output at position t depends only on tokens
# 0..t. In particular the keys and values of past tokens never change when new tokens arrive:
# they are x_j W_k and x_j W_v for fixed j. So decoding can keep them, and for each new token
# compute only **its own** q, k, v, append k and v to the cache, and attend with its q over
# everything cached. The work per token drops from "the whole sequence" to "one position".
#
# In minqkv, `model.new_caches()` gives one `KVCache` per layer; passing `caches=` to the model
# makes it treat `ids` as the new tokens after the cached ones. We feed a sequence one token at
# a time and compare every step's logits with one full forward pass over the whole sequence.

# %%
T, V = 24, 13
config = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=32, dtype="float64")
model = GPT(config)
ids = np.random.default_rng(0).integers(0, V, (1, T))  # (B, T)

with no_grad():
    full_logits, _ = model(ids)  # (1, T, V), all positions at once
    caches = model.new_caches()
    worst = 0.0
    for t in range(T):
        step_logits, _ = model(ids[:, t:t + 1], caches=caches)  # (1, 1, V): only the new token
        worst = max(worst, np.abs(step_logits.data[0, 0] - full_logits.data[0, t]).max())
        assert np.allclose(step_logits.data[0, 0], full_logits.data[0, t], rtol=0, atol=1e-12), t
print(f"{T} tokens one at a time with the cache = one full pass: max difference {worst:.1e}")
print("cached tokens per layer:", [c.length for c in caches])

# %% [markdown]
# The saving in time, generating 48 tokens from a wider model with and without the cache
# (`model.generate` uses the cache; the second loop recomputes the growing sequence every step).
# Timings on a shared machine are noisy, so they are printed, not asserted.

# %%
big = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=4, n_head=4, n_embd=128))
prompt = ids[:, :16]
t0 = time.perf_counter()
with_cache = big.generate(prompt, 48, temperature=1.0, top_k=1)  # top_k=1: always the likeliest
t_cache = time.perf_counter() - t0
t0 = time.perf_counter()
seq = prompt
with no_grad():
    for _ in range(48):
        logits, _ = big(seq)  # the whole sequence again
        seq = np.concatenate([seq, logits.data[:, -1].argmax(-1)[:, None]], axis=1)
t_full = time.perf_counter() - t0
print(f"48 tokens: with cache {1e3 * t_cache:.0f} ms, recomputing everything {1e3 * t_full:.0f} ms")
assert np.array_equal(with_cache, seq)  # same tokens either way

# %% [markdown]
# ## 2. What the cache costs
#
# Per token and per layer, the canonical `abc` caches K and V: 2 x C floats. Over a long context
# and many layers that is the memory that limits how many conversations a server can hold.
# Three ways to shrink it:
#
# * **`abb`** (shared-kv): K and V are one tensor x W_kv, cached once: C floats, half.
# * **GQA** (grouped-query attention, `n_kv_head` < `n_head`): K and V get fewer heads than Q;
#   a group of query heads shares one key/value head. With n_kv_head = H / G, the cache is G
#   times smaller.
# * **MQA** (multi-query, `n_kv_head = 1`): one key/value head for all query heads.
#
# They combine: `abb+mqa` caches a single head of hd floats per token, 2 H times less than
# `abc`. The caches report what they actually store (`KVCache.floats_per_token()`), and that
# matches what the layer's `AttentionSpec` predicts (`kv_cache_floats_per_token()`):

# %%
variants = {"abc": {}, "abb": {"code": "abb"}, "abc+gqa2": {"n_kv_head": 2},
            "abc+mqa": {"n_kv_head": 1}, "abb+mqa": {"code": "abb", "n_kv_head": 1}}
measured = {}
for label, overrides in variants.items():
    m = GPT(GPTConfig(**{**config.to_dict(), **overrides}))
    caches = m.new_caches()
    with no_grad():
        m(ids[:, :5], caches=caches)
    measured[label] = caches[0].floats_per_token()
    predicted = m.blocks[0].attn.spec.kv_cache_floats_per_token()
    print(f"{label:9} caches {measured[label]:3} floats per token per layer (predicted {predicted})")
    assert measured[label] == predicted
assert measured["abb"] * 2 == measured["abc"] and measured["abb+mqa"] * 2 * 4 == measured["abc"]

# %% [markdown]
# At the size of GPT-2 small (C = 768, 12 heads, 12 layers), in float32 bytes, as the context
# grows (figures from `minqkv.lab.variants.preset_rows`, no model built):

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

contexts = np.arange(0, 1025, 64)
fig, ax = plt.subplots(figsize=(7, 4.5))
for label, code, n_kv_head in [("abc", "abc", None), ("abb (shared-kv)", "abb", None),
                               ("abc + GQA 4 kv heads", "abc", 4), ("abc + MQA", "abc", 1),
                               ("abb + MQA", "abb", 1)]:
    row = next(r for r in preset_rows("gpt2-small", n_kv_head=n_kv_head) if r["code"] == code)
    megabytes = row["kv_cache_floats_per_token"] * 12 * 4 * contexts / 2 ** 20  # 12 layers, 4 bytes
    ax.plot(contexts, megabytes, label=f"{label}: {row['kv_cache_floats_per_token']} floats/token/layer")
ax.set(xlabel="tokens in context", ylabel="MB per sequence",
       title="KV cache of a GPT-2-small-sized model (float32)")
ax.legend(fontsize=8)
fig.savefig(out / "06_kv_cache.png", dpi=110, bbox_inches="tight")
plt.close(fig)
print("wrote", out / "06_kv_cache.png")

# %% [markdown]
# ## 3. GQA's grouping, by hand
#
# With H query heads and Hkv key/value heads, each key/value head serves G = H / Hkv
# consecutive query heads: query head h reads key/value head h // G. `attend` does this by
# grouping the query heads in blocks of G and letting each key head serve its block, so the
# keys are never copied. The result must be what ordinary multi-head attention gives when each
# key/value head is simply **repeated** G times, which we check:

# %%
B, H, Hkv, hd = 1, 4, 2, 8
G = H // Hkv
print("query head -> key/value head:", {h: h // G for h in range(H)})
rng = np.random.default_rng(1)
q = Tensor(rng.standard_normal((B, H, T, hd)))
k = Tensor(rng.standard_normal((B, Hkv, T, hd)))
v = Tensor(rng.standard_normal((B, Hkv, T, hd)))
with no_grad():
    y_grouped = attend(q, k, v)  # (B, T, H * hd)
    k_repeated = Tensor(np.repeat(k.data, G, axis=1))  # (B, H, T, hd): head h // G copied to h
    v_repeated = Tensor(np.repeat(v.data, G, axis=1))
    y_repeated = attend(q, k_repeated, v_repeated)
print(f"grouped vs repeated keys: max difference {np.abs(y_grouped.data - y_repeated.data).max():.1e}")
assert np.allclose(y_grouped.data, y_repeated.data, rtol=0, atol=1e-12)

# %% [markdown]
# **What you learned:** decoding with a KV cache gives exactly the logits of a full pass while
# computing only the new position; the cache holds K and V for every past token and layer;
# `abb` halves it by caching one tensor for both, GQA and MQA divide it by sharing key/value
# heads between groups of query heads, and the two combine.

# %%
assert (out / "06_kv_cache.png").exists()
print("lesson 6 done")
