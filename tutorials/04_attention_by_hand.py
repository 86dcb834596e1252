# %% [markdown]
# # Lesson 4: one attention head by hand, then minqkv's
#
# Run: `python tutorials/04_attention_by_hand.py [--out FOLDER]` (times: tutorials/README.md).
# Draws `04_attention.png`.
#
# Attention is the one place in a Transformer where positions talk to each other. Every other
# layer treats each position on its own. This lesson writes causal self-attention in plain
# NumPy, line by line, and then checks that minqkv's `abc` attention (the canonical one, three
# separate projections) computes exactly the same numbers.

# %%
import argparse
import tempfile
from pathlib import Path

import numpy as np

from minqkv.attention import CausalSelfAttention, attend, scores_and_weights
from minqkv.model import GPTConfig
from minqkv.tensor import Tensor, no_grad

parser = argparse.ArgumentParser(description="Lesson 4: attention by hand")
parser.add_argument("--out", default=None, help="folder for the PNG (default: a temporary folder)")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson04-"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. The setting
#
# A sequence of T = 8 positions (think: characters), each a vector of C = 16 numbers. In a
# model these vectors come from embeddings and earlier layers; here they are random. Shapes
# are written as (B, T, C): batch, time (position), channels.
#
# The layer is minqkv's: a `GPTConfig` holds the sizes, `attention_spec(0)` reads layer 0's
# code ('abc') with those sizes, and `CausalSelfAttention` creates the weights. We ask for
# float64 so that "equal" can mean equal to 1e-12.

# %%
T, C = 8, 16
config = GPTConfig(code="abc", n_embd=C, n_head=1, n_layer=1, block_size=T, dtype="float64")
attn = CausalSelfAttention(config.attention_spec(0), dtype=np.float64, rng=np.random.default_rng(0))
for seed, (name, param) in enumerate(attn.named_parameters()):  # a seed of its own for each matrix
    param.data[:] = np.random.default_rng(100 + seed).standard_normal(param.shape) * 0.25  # livelier than init
x = np.random.default_rng(1).standard_normal((1, T, C))  # (B, T, C)
print("weights:", {name: p.shape for name, p in attn.named_parameters()})

# %% [markdown]
# ## 2. One head, by hand
#
# Each position asks a question and offers an answer:
#
# * its **query** q_i = x_i W_q: what am I looking for?
# * its **key** k_j = x_j W_k: what do I contain, as seen by a query?
# * its **value** v_j = x_j W_v: what do I hand over if someone attends to me?
#
# The **score** of query i for key j is the dot product q_i . k_j, divided by sqrt(d) (d is the
# width of q and k) so that its size does not grow with the width. Softmax turns each row of
# scores into weights that are positive and sum to 1, and the output at i is the weighted
# average of the values: y_i = sum_j A[i, j] v_j. Finally an output projection W_o mixes the
# result back into the model's width.

# %%
W_q, W_k, W_v, W_o = (attn.w_q.data, attn.w_k.data, attn.w_v.data, attn.w_o.data)  # each (C, C)
q = x[0] @ W_q  # (T, C) @ (C, C) -> (T, C)
k = x[0] @ W_k
v = x[0] @ W_v
S = q @ k.T / np.sqrt(C)  # (T, T): S[i, j] = q_i . k_j / sqrt(d)

# %% [markdown]
# W_q and W_k are different matrices, so "how much i looks for j" (S[i, j]) and "how much j
# looks for i" (S[j, i]) are different numbers: the scores are not symmetric. Lesson 5 shows
# what changes when one matrix serves as both.

# %%
assert not np.allclose(W_q, W_k)  # four independent matrices, not one drawn four times
print(f"largest |S - S^T|: {np.abs(S - S.T).max():.2f} (largest |S|: {np.abs(S).max():.2f})")
assert not np.allclose(S, S.T)

# %% [markdown]
# ## 3. The causal mask
#
# A language model predicts the next character from the ones before it. If position i could
# attend to position j > i, it would simply read the answer. So before the softmax the scores
# of future keys are set to minus infinity: exp(-inf) = 0, those keys get weight 0. The visible
# part is the lower triangle, diagonal included.

# %%
future = np.triu(np.ones((T, T), dtype=bool), k=1)  # True above the diagonal: j > i
S_masked = np.where(future, -np.inf, S)
A = np.exp(S_masked - S_masked.max(axis=1, keepdims=True))  # the max-subtraction of lesson 3
A = A / A.sum(axis=1, keepdims=True)  # (T, T), rows sum to 1
y_by_hand = A @ v  # (T, T) @ (T, C) -> (T, C)
out_by_hand = y_by_hand @ W_o
print("row sums of A:", A.sum(axis=1).round(12))
print("row 0 sees only itself:", A[0].round(3))

# %% [markdown]
# ## 4. The same with minqkv
#
# minqkv splits attention in two: `project(x) -> q, k, v` is the part that differs between
# variants (which weights, shared or not, identity or not); `attend(q, k, v)` is the part every
# variant shares (scores, mask, softmax, weighted sum). Heads are an axis of their own, so
# shapes are q (B, H, T, hd). `attend` returns the output with heads merged back (B, T, C);
# to look at the attention itself, `scores_and_weights(q, k)` returns the scores before the
# mask and the weights after the softmax. Calling the layer itself runs `project`, `attend`
# and then W_o.

# %%
with no_grad():
    q_m, k_m, v_m = attn.project(Tensor(x))  # each (1, 1, T, C): one head of width C
    y_m = attend(q_m, k_m, v_m)  # (1, T, C)
    scores_m, weights_m = scores_and_weights(q_m, k_m)  # (1, 1, T, T) each
    out_m = attn(Tensor(x))  # (1, T, C)
for name, mine, theirs in [("scores", S, scores_m.data[0, 0]), ("weights", A, weights_m.data[0, 0]),
                           ("y", y_by_hand, y_m.data[0]), ("output", out_by_hand, out_m.data[0])]:
    print(f"{name:8} by hand vs minqkv: max difference {np.abs(mine - theirs).max():.1e}")
    assert np.allclose(mine, theirs, rtol=0, atol=1e-12)

# %% [markdown]
# The mask really does stop information flowing backwards: change the **last** position's
# input, and the outputs of every earlier position stay exactly the same.

# %%
x_changed = x.copy()
x_changed[0, -1] += 10.0
with no_grad():
    out_changed = attn(Tensor(x_changed)).data
assert np.array_equal(out_changed[0, :-1], out_m.data[0, :-1])
assert not np.allclose(out_changed[0, -1], out_m.data[0, -1])
print("changing the last input changed only the last output")

# %% [markdown]
# ## 5. Heads
#
# One head computes one pattern of weights per position. **Multi-head** attention cuts the C
# channels of q, k and v into H groups of hd = C / H and runs the same attention on each group
# separately, so each head can look at different positions for a different reason; the H
# outputs are laid side by side again. The weights are the same matrices as before (C, C):
# a head is just a slice of their columns.

# %%
H = 4
hd = C // H
config4 = GPTConfig(code="abc", n_embd=C, n_head=H, n_layer=1, block_size=T, dtype="float64")
attn4 = CausalSelfAttention(config4.attention_spec(0), dtype=np.float64)
for (_, mine), (_, theirs) in zip(attn.named_parameters(), attn4.named_parameters()):
    theirs.data[:] = mine.data  # the same weights as the one-head layer

heads = []
for h in range(H):
    cols = slice(h * hd, (h + 1) * hd)  # this head's channels
    S_h = q[:, cols] @ k[:, cols].T / np.sqrt(hd)  # (T, T); scaled by the head's width now
    S_h = np.where(future, -np.inf, S_h)
    A_h = np.exp(S_h - S_h.max(axis=1, keepdims=True))
    A_h = A_h / A_h.sum(axis=1, keepdims=True)
    heads.append(A_h @ v[:, cols])  # (T, hd)
y_heads = np.concatenate(heads, axis=1)  # (T, H * hd) = (T, C)

with no_grad():
    q4, k4, v4 = attn4.project(Tensor(x))  # (1, H, T, hd) each
    y4 = attend(q4, k4, v4)  # (1, T, C)
    _, weights4 = scores_and_weights(q4, k4)  # (1, H, T, T)
print(f"{H} heads by hand vs minqkv: max difference {np.abs(y_heads - y4.data[0]).max():.1e}")
assert np.allclose(y_heads, y4.data[0], rtol=0, atol=1e-12)

# %% [markdown]
# ## 6. A picture
#
# Top row, the single head: the raw scores (every query against every key), the same scores
# with the future masked (white), the weights after softmax, and S - S^T, which is not zero:
# the canonical head's scores have a direction. Bottom row: the weights of the four heads,
# each its own pattern over the same positions, on one colour scale from 0 to 1.

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(2, 4, figsize=(15, 7), layout="constrained")
limit = np.abs(S - S.T).max()
panels = [(S, "scores S = q k^T / sqrt(d)", {}), (S_masked, "future masked (white)", {}),
          (A, "weights: row softmax", {"vmin": 0, "vmax": 1}),
          (S - S.T, "S - S^T (not zero)", {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit})]
for ax, (matrix, title, style) in zip(axes[0], panels):
    image = ax.imshow(np.ma.masked_invalid(matrix), **{"cmap": "viridis", **style})
    ax.set(title=title, xlabel="key position j", ylabel="query position i")
    fig.colorbar(image, ax=ax, shrink=0.8)
for h, ax in enumerate(axes[1]):
    image = ax.imshow(weights4.data[0, h], cmap="viridis", vmin=0, vmax=1)
    ax.set(title=f"head {h} of {H}: weights", xlabel="key position j", ylabel="query position i")
fig.colorbar(image, ax=axes[1], shrink=0.8, label="weight")
fig.savefig(out / "04_attention.png", dpi=100)
plt.close(fig)
print("wrote", out / "04_attention.png")

# %% [markdown]
# **What you learned:** attention is four matrix products, a mask and a softmax; minqkv's
# `project` makes q, k, v and `attend` does the rest, and both agree with the NumPy written
# here to 1e-12; with separate W_q and W_k the scores are not symmetric; the causal mask keeps
# the future out; heads are slices of the channels.

# %%
assert np.allclose(np.tril(A).sum(axis=1), 1.0) and np.all(A[future] == 0)
assert not np.allclose(W_q, W_k) and not np.allclose(S, S.T)
assert (out / "04_attention.png").exists()
print("lesson 4 done")
