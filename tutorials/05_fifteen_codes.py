# %% [markdown]
# # Lesson 5: fifteen ways to build attention
#
# Run: `python tutorials/05_fifteen_codes.py [--out FOLDER]` (times: tutorials/README.md). Draws
# `05_costs.png` and `05_symmetry.png`.
#
# Lesson 4 used three separate projections, W_q, W_k and W_v. Must they be separate? Could the
# query and the key share one matrix? Could the value be the input itself? minqkv names every
# such choice with a **code** of three characters for (Q, K, V): equal letters share one
# weight matrix, `-` means no projection at all (the role is the input x itself).
#
#     abc   three separate weights (the usual attention)
#     abb   K and V share a weight: Q = x W_a, K = V = x W_b
#     aab   Q and K share a weight (the study's "no key": the query serves as key)
#     aaa   one weight for all three
#     --a   only the value is projected: Q = K = x
#     ---   nothing is projected
#
# Renaming letters changes nothing ('bcc' is 'abb'), so there are exactly 15 codes.

# %%
import argparse
import tempfile
from pathlib import Path

import numpy as np

from minqkv.lab.analysis import score_asymmetry
from minqkv.attention import ALL_CODES, CausalSelfAttention, attend, names_of, parse_code, scores_and_weights
from minqkv.model import GPT, GPTConfig
from minqkv.tensor import Tensor, no_grad
from minqkv.lab.variants import format_rows, variant_rows

parser = argparse.ArgumentParser(description="Lesson 5: the fifteen codes")
parser.add_argument("--out", default=None, help="folder for the PNGs (default: a temporary folder)")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson05-"))
out.mkdir(parents=True, exist_ok=True)

print(len(ALL_CODES), "codes:", " ".join(ALL_CODES))
print("'shared-kv' is", parse_code("shared-kv"), "| 'bcc' is", parse_code("bcc"),
      "| names of aab:", names_of("aab"))
assert len(ALL_CODES) == 15

# %% [markdown]
# ## 1. Every code runs
#
# The same layer class builds every code: it creates one weight per distinct letter (named by
# the roles it serves: `w_kv` serves K and V) and `project` sends x through them. Since `attend`
# is shared, each code is only a different way of making q, k and v. Here is each one's set of
# weights, and a forward pass of a whole small GPT with that code in every layer.

# %%
C, H, T, V = 32, 4, 8, 11
x = Tensor(np.random.default_rng(0).standard_normal((2, T, C)))  # (B, T, C)
ids = np.random.default_rng(1).integers(0, V, (2, T))
for code in ALL_CODES:
    config = GPTConfig(code=code, vocab_size=V, n_embd=C, n_head=H, n_layer=2, block_size=T, dtype="float64")
    attn = CausalSelfAttention(config.attention_spec(0), dtype=np.float64)
    with no_grad():
        q, k, v = attn.project(x)
        y = attend(q, k, v)  # (2, T, C)
        logits, _ = GPT(config)(ids)
    weights = [name for name, _ in attn.named_parameters() if name.startswith("w_") and name != "w_o"]
    print(f"{code}  weights {' '.join(weights) or '(none)':14} q {q.shape} -> y {y.shape}, GPT logits {logits.shape}")
    assert y.shape == (2, T, C) and logits.shape == (2, T, V) and np.isfinite(logits.data).all()

# %% [markdown]
# ## 2. What each code costs
#
# Three figures tell the codes apart, per layer, without training anything
# (`minqkv.lab.variants.variant_rows`, or `minqkv variants` on the command line):
#
# * **parameters**: C x C per distinct letter, plus the output projection W_o (C x C, kept by
#   every code here). `abc` has 4 C^2, `abb` 3 C^2, `aaa` 2 C^2, `---` only W_o.
# * **FLOPs per token**: two per multiply-add, for the projections, the scores q.k and the
#   weighted sum of values over a context of `block_size` keys, and W_o.
# * **KV-cache floats per token**: what decoding must remember for every past token (lesson 6).
#   K and V separately is 2 C; when K and V are one tensor (`abb`, `aaa`, `-aa`, ...) it is
#   stored once, C. That includes `a--` and `---`, where K and V are both x itself.
#
# The last column says whether the scores are symmetric; section 3 is about that.

# %%
rows = variant_rows(n_embd=128, n_head=4, block_size=128)
print(format_rows(rows))
by_code = {row["code"]: row for row in rows}
C2 = 128 * 128
assert by_code["abc"]["params_per_layer"] == 4 * C2 and by_code["abb"]["params_per_layer"] == 3 * C2
assert by_code["aaa"]["params_per_layer"] == 2 * C2 and by_code["---"]["params_per_layer"] == C2
assert by_code["abb"]["kv_cache_floats_per_token"] * 2 == by_code["abc"]["kv_cache_floats_per_token"]

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
codes = [row["code"] for row in rows]
axes[0].bar(codes, [row["params_per_layer"] / 1000 for row in rows], color="tab:blue")
axes[0].set(ylabel="thousands", title="attention parameters per layer (C=128, with W_o)")
axes[1].bar(codes, [row["kv_cache_floats_per_token"] for row in rows], color="tab:orange")
axes[1].set(ylabel="floats", title="KV cache per token per layer")
for ax in axes:
    ax.tick_params(axis="x", rotation=60)
fig.savefig(out / "05_costs.png", dpi=100)
plt.close(fig)
print("wrote", out / "05_costs.png")

# %% [markdown]
# ## 3. Sharing Q and K makes the scores symmetric
#
# With `aab` (and `aaa`, `--a`, `---`, `aa-`) the query and the key are the very same tensor,
# so the score of i for j is q_i . q_j = q_j . q_i: the matrix S equals its transpose. Two
# consequences:
#
# * the relation has no direction: "how much should i look at j" is "how much should j look
#   at i", though "a verb looks for its subject" need not mean "a subject looks for its verb";
# * q_i . q_j <= |q_i| |q_j| (Cauchy-Schwarz), so among tokens of similar length the largest
#   score of a row tends to be its own diagonal: tokens prefer to attend to themselves.
#
# Two modifiers break the symmetry, each at a small cost in parameters:
#
# * **rotate**: a learned orthogonal matrix R per head turns the keys, K = Q R, so
#   S = Q R Q^T. R is built as the Cayley transform of a skew matrix, (I + A)^-1 (I - A), which
#   is orthogonal whatever A is; it starts at the identity (symmetric) and training moves it.
# * **pos2d**: a learned bias B[i, j] for every (query position, key position) is added to the
#   scores, S = Q Q^T / sqrt(hd) + B, and nothing makes B symmetric.
#
# To see them without training, we set R's generator and B to random values, as training
# would move them. `score_asymmetry` (from `minqkv.lab.analysis`) measures
# ||S - S^T|| / (2 ||S||): 0 for symmetric, about 0.7 for unrelated entries.

# %%
cases = [("aab", {}), ("aab+rotate", {"rotate": True}), ("aab+pos2d", {"pos2d": True}), ("abc", {})]
maps = {}
for label, modifiers in cases:
    config = GPTConfig(code=label.split("+")[0], n_embd=C, n_head=H, n_layer=1, block_size=T,
                       dtype="float64", **modifiers)
    attn = CausalSelfAttention(config.attention_spec(0), dtype=np.float64, rng=np.random.default_rng(3))
    rng = np.random.default_rng(4)
    if config.rotate:
        attn.rotation_param.data[:] = 0.5 * rng.standard_normal(attn.rotation_param.shape)
        with no_grad():
            R = attn.rotation().data  # (H, hd, hd)
        assert np.allclose(R @ np.swapaxes(R, -1, -2), np.eye(C // H))  # orthogonal: R R^T = I
    if config.pos2d:
        attn.pos_bias.data[:] = rng.standard_normal(attn.pos_bias.shape)
    with no_grad():
        q, k, v = attn.project(x)
        bias = attn.pos_bias if config.pos2d else None  # (H, T, T)
        scores, _ = scores_and_weights(q, k, bias)  # (B, H, T, T), before the mask
    S = scores.data[0, 0]
    maps[label] = (S, score_asymmetry(scores.data))
    symmetric = config.attention_spec(0).symmetric()
    print(f"{label:11} symmetric by construction: {symmetric!s:5}  max |S - S^T| = "
          f"{np.abs(S - S.T).max():.1e}   asymmetry {score_asymmetry(scores.data):.3f}")
    assert np.allclose(S, S.T, rtol=0, atol=1e-12) == symmetric

# %%
fig, axes = plt.subplots(len(maps), 3, figsize=(10, 3 * len(maps)), layout="constrained")
for row, (label, (S, asymmetry)) in zip(axes, maps.items()):
    limit = np.abs(S - S.T).max(initial=np.abs(S).max())  # one scale per row: S - S^T seen at S's size
    titles = [f"{label}: S", f"{label}: S^T", f"S - S^T: max {np.abs(S - S.T).max():.1e}\nasymmetry {asymmetry:.3f}"]
    for ax, matrix, title in zip(row, [S, S.T, S - S.T], titles):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set(title=title, xticks=[], yticks=[])
    fig.colorbar(image, ax=row, shrink=0.9, label="score")
fig.savefig(out / "05_symmetry.png", dpi=90)
plt.close(fig)
print("wrote", out / "05_symmetry.png")

# %% [markdown]
# In the picture each row has one colour scale (its colour bar), so S - S^T is drawn at the
# size of S itself, and its largest value is written above it. The rows' scales differ up to a
# hundred times (fresh weights give scores of a few hundredths; the random 2-D bias adds numbers
# of size 1), which is why the titles also give the asymmetry, a ratio that does not depend on
# the scale. The first row's S - S^T is blank: `aab` is symmetric to the last bit, and its
# diagonal (each token with itself) stands out, as Cauchy-Schwarz predicts. The rotation and
# the 2-D bias each fill it in, as `abc` does with its separate W_q and W_k. Whether the
# network *uses* that freedom is a question for training: lesson 8 compares the variants and
# lesson 10 measures the learned asymmetry.
#
# **What you learned:** a code says which projections exist and which are shared; the 15
# codes differ in parameters, FLOPs and KV cache in ways you can count; tying Q and K makes the
# scores symmetric, and a learned rotation or a 2-D positional bias breaks that.

# %%
assert (out / "05_costs.png").exists() and (out / "05_symmetry.png").exists()
print("lesson 5 done")
