# %% [markdown]
# # Lesson 10: reading the weights
#
# Run: `python tutorials/10_reading_the_weights.py [--out FOLDER]` (times: tutorials/README.md).
# Draws `10_spectra.png`, `10_overlaps.png` and `10_attention.png`. `--steps 2000` trains ten
# times longer: the largest singular values of W_q and W_k grow to about 4, their effective
# ranks fall to half the width (32 of 64, from 41 after 200 steps), and every overlap stays
# well above the random baseline.
#
# Lessons 5 and 8 asked whether attention *needs* three projections. The weights of a trained
# model give a second kind of evidence: if W_q and W_k of a canonical model end up reading the
# same few directions of the input, tying them (`aab`) costs little; if a projection uses only
# a handful of directions, most of its C x C numbers are not doing much. This lesson trains a
# small canonical model and reads its weights with `minqkv.lab.analysis` (the `minqkv analyze`
# command prints the same report for any checkpoint).

# %%
import argparse
import tempfile
from pathlib import Path

import numpy as np

from minqkv.lab.analysis import (analyze_model, describe_matrix, effective_rank, energy_rank, format_report,
                                 principal_cosines, random_subspace_cosine, role_overlaps, role_weight,
                                 attention_weights)
from minqkv.attention import CausalSelfAttention
from minqkv.checkpoint import load_model
from minqkv.data import load_corpus
from minqkv.model import GPT, GPTConfig
from minqkv.train import TrainConfig, train

parser = argparse.ArgumentParser(description="Lesson 10: reading the weights")
parser.add_argument("--out", default=None, help="folder for the run and the PNGs (default: a temporary folder)")
parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson10-"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Two measuring sticks, on matrices we know
#
# **Singular values.** Any matrix W (C, width) maps the input space through a set of
# orthogonal input directions (the left-singular vectors u_i), each scaled by a singular
# value s_i >= 0. Large s_i: directions the projection reads strongly; near-zero s_i:
# directions it ignores.
#
# **Effective rank** turns the list into one number: normalise the singular values to sum to
# one, p_i = s_i / sum(s), and take exp of their entropy, exp(-sum p_i log p_i). For n equal
# singular values it is n, for a single non-zero one it is 1, and in between it counts "how
# many directions, roughly". `energy_rank` is a blunter count: how many of the largest s_i hold
# 90% of sum(s_i^2).

# %%
print("identity 8x8:", effective_rank(np.ones(8)), "  rank one:", effective_rank([3.0, 0, 0, 0]))
print("singular values 4, 2, 1, 1: effective rank", round(effective_rank([4, 2, 1, 1]), 3),
      " energy rank", energy_rank([4, 2, 1, 1]))
assert np.isclose(effective_rank(np.ones(8)), 8) and np.isclose(effective_rank([3.0, 0, 0, 0]), 1)

# %% [markdown]
# **Subspace overlap.** Do two projections read the same directions? Take the top-r input
# directions of each (two r-dimensional subspaces of the C-dimensional input space) and
# compute their **principal angles**: the cosines are the singular values of Qa^T Qb for
# orthonormal bases Qa and Qb. A cosine of 1 is a direction both share; 0 is a direction
# orthogonal to the other subspace. The mean cosine summarises it.
#
# A mean cosine means nothing without a **baseline**: two *random* r-dimensional subspaces of
# R^C already overlap somewhat, and more so as r approaches C. `random_subspace_cosine(C, r, r)`
# is that baseline (averaged over random draws); an overlap is interesting only above it.

# %%
rng = np.random.default_rng(0)
A = rng.standard_normal((64, 8))
same = principal_cosines(A, A @ rng.standard_normal((8, 8)))  # same column space, other basis
orthogonal = principal_cosines(np.eye(64)[:, :8], np.eye(64)[:, 8:16])
print("same subspace:", same.round(6)[:3], "...  orthogonal:", orthogonal[:3], "...")
for r in (4, 16, 48):
    print(f"random baseline, two {r}-dim subspaces of R^64: mean cosine {random_subspace_cosine(64, r, r):.3f}")
assert np.allclose(same, 1) and np.allclose(orthogonal, 0)
assert random_subspace_cosine(64, 4, 4) < random_subspace_cosine(64, 48, 48)

# %% [markdown]
# ## 2. Train a small canonical model
#
# The model of lesson 7 (two layers, C = 64, on Shakespeare), trained for 200 steps by
# default. We keep an untrained copy (same seed, so the very weights training started from) to
# see what training changed.

# %%
model_config = GPTConfig(code="abc", n_layer=2, n_head=4, n_embd=64, block_size=64)
run_dir = out / "run"
final = train(model_config, TrainConfig(data="shakespeare", out=str(run_dir), steps=args.steps, batch_size=32,
                                        warmup_steps=min(30, args.steps // 10), eval_interval=args.steps,
                                        eval_iters=4), progress=False)
model, tokenizer, _ = load_model(run_dir)
untrained = GPT(model.config)  # same config and seed: the starting weights
print(f"trained {args.steps} steps: val loss {final['val_loss']:.3f}")

# %% [markdown]
# ## 3. Spectra and effective rank
#
# At initialisation each W is a random Gaussian matrix: its singular values are spread fairly
# evenly (the Marchenko-Pastur law), so its effective rank is a large fraction of C. Training
# adds structure: a few directions grow, and the spectrum becomes steeper.

# %%
layer = 0
spectra = {}
for name, m in (("untrained", untrained), ("trained", model)):
    attn: CausalSelfAttention = m.blocks[layer].attn
    for role in "qkv":
        d = describe_matrix(role_weight(attn, role))
        spectra[(name, role)] = np.array(d["singular_values"])
        print(f"{name:9} W_{role}: effective rank {d['effective_rank']:5.1f} of {d['shape'][1]}, "
              f"rank90 {d['rank90']:2}, largest singular values {np.round(d['singular_values'][:4], 3)}")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.5))
for (name, role), s in spectra.items():
    ax.plot(np.arange(1, len(s) + 1), s / s.sum(), linestyle="-" if name == "trained" else ":",
            color={"q": "tab:blue", "k": "tab:orange", "v": "tab:green"}[role], label=f"W_{role} {name}")
ax.set(yscale="log", xlabel="index i (largest first)", ylabel="s_i / sum(s)",
       title=f"layer {layer}: singular values of the projections")
ax.legend(fontsize=8, ncol=2)
fig.savefig(out / "10_spectra.png", dpi=110, bbox_inches="tight")
plt.close(fig)
print("wrote", out / "10_spectra.png")

# %% [markdown]
# ## 4. Do Q, K and V read the same directions?
#
# `role_overlaps` compares every pair of projected roles of one layer: the top-r subspace of
# each (r = the smaller effective rank, rounded, unless given), the mean principal cosine, the
# random baseline for that r, and the cosine between the two weight matrices flattened into long
# vectors (1 would mean W_q and W_k are the same matrix up to scale). Here with r = 8, where the
# baseline is low enough to read:

# %%
overlaps = {}
for name, m in (("untrained", untrained), ("trained", model)):
    for o in role_overlaps(m.blocks[layer].attn, subspace_dim=8):
        overlaps[(name, o["a"] + o["b"])] = o
        print(f"{name:9} {o['a'].upper()}-{o['b'].upper()}: mean cosine {o['mean_cos']:.3f} "
              f"(random {o['random_baseline_mean_cos']:.3f}), flattened cosine {o['flat_cos']:+.3f}")

fig, ax = plt.subplots(figsize=(6, 4))
pairs = ["qk", "qv", "kv"]
for i, name in enumerate(("untrained", "trained")):
    ax.bar(np.arange(3) + 0.35 * i, [overlaps[(name, p)]["mean_cos"] for p in pairs], width=0.35, label=name)
ax.axhline(overlaps[("trained", "qk")]["random_baseline_mean_cos"], color="gray", linestyle=":",
           label="random subspaces")
ax.set_xticks(np.arange(3) + 0.175, ["Q-K", "Q-V", "K-V"])
ax.set(ylabel="mean principal cosine (top 8 directions)", title=f"layer {layer}: shared input directions")
ax.legend(fontsize=8)
fig.savefig(out / "10_overlaps.png", dpi=110, bbox_inches="tight")
plt.close(fig)
print("wrote", out / "10_overlaps.png")

# %% [markdown]
# Before training, every pair sits at the random baseline, as it must: three independent random
# matrices. After training, Q and K share clearly more of their top directions than chance,
# while their flattened cosine stays near 0: W_q and W_k read much the same input directions
# but are not the same matrix (they map those directions differently). That is the situation
# in which tying them, plus something that lets them differ a little (the learned rotation of
# `aab+rotate`), is worth trying. The ranking depends on the layer and the run; `10_overlaps.png`
# shows layer 0.
#
# A tied variant is the extreme case: in `aab` the query and key *are* one matrix, so their
# overlap is 1 by construction, and the report says so instead of measuring it.

# %%
tied = CausalSelfAttention(GPTConfig(code="aab", n_embd=64, n_head=4, n_layer=1).attention_spec(0))
tied_qk = next(o for o in role_overlaps(tied) if (o["a"], o["b"]) == ("q", "k"))
print("aab, Q-K:", {key: tied_qk[key] for key in ("tied", "weight", "mean_cos")})
assert tied_qk["tied"] and np.isclose(tied_qk["mean_cos"], 1.0)

# %% [markdown]
# ## 5. The whole report, and what the heads look at
#
# `analyze_model` gathers all of this for every layer, plus the score asymmetry of lesson 5
# measured on held-out text (a canonical model is free to be asymmetric; how far it goes is
# learned). `attention_weights` gives the attention weights of one sequence, one (1, H, T, T)
# array per layer, which we draw: a row per layer, a column per head, the characters on the
# axes (a space is drawn as `·`, a new line as `¶`). (`save_heatmaps`, which `minqkv analyze`
# uses, writes the same weights as one PNG per layer.)

# %%
corpus = load_corpus("shakespeare")
batches = corpus.eval_batches("val", 8, model.config.block_size, 2)
report = analyze_model(model, batches, subspace_dim=8)
print(format_report(report))
line = tokenizer.encode("ROMEO:\nBut soft, what light through yonder")[None, :]  # (1, T)
weights_by_layer = attention_weights(model, line)  # one (1, H, T, T) per layer
chars = [{" ": "\u00b7", "\n": "\u00b6"}.get(ch, ch) for ch in tokenizer.decode(line[0])]
n_layers, H = len(weights_by_layer), weights_by_layer[0].shape[1]
fig, axes = plt.subplots(n_layers, H, figsize=(5 * H + 1, 5.2 * n_layers), layout="constrained", squeeze=False)
for layer, weights in enumerate(weights_by_layer):
    for h, ax in enumerate(axes[layer]):
        image = ax.imshow(weights[0, h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {h}")
        ax.set_xticks(range(len(chars)), chars, fontsize=7, fontfamily="monospace")
        ax.set_yticks(range(len(chars)), chars, fontsize=7, fontfamily="monospace")
        ax.set_xlabel("key (the character attended to)")
    axes[layer, 0].set_ylabel("query (the character attending)")
fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
fig.savefig(out / "10_attention.png", dpi=100)
plt.close(fig)
print("wrote", out / "10_attention.png")

# %% [markdown]
# **What you learned:** singular values show how many input directions a projection uses
# (effective rank summarises them); principal angles show whether two projections read the
# same directions, which only means something above the random baseline; tied variants are
# the limit where the overlap is 1; `minqkv analyze --out RUN` prints this report for any run.

# %%
for role in "qk":  # training concentrated the query and key projections on fewer directions
    assert effective_rank(spectra[("trained", role)]) < effective_rank(spectra[("untrained", role)])
qk = overlaps[("trained", "qk")]  # trained Q and K share more input directions than chance
assert qk["mean_cos"] > qk["random_baseline_mean_cos"]
assert all(0 <= layer_report["asymmetry"] <= 1 for layer_report in report["layers"])
assert (out / "10_spectra.png").exists() and (out / "10_overlaps.png").exists()
assert (out / "10_attention.png").exists()
assert all(np.allclose(w.sum(axis=-1), 1.0) for w in weights_by_layer)  # each query's weights sum to 1
print("lesson 10 done")
