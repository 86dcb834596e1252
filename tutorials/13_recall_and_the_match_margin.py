# %% [markdown]
# # Lesson 13: recall and the match margin
#
# Run: `python tutorials/13_recall_and_the_match_margin.py [--out FOLDER]` (times:
# tutorials/README.md). Draws `13_match_margins.png` (into --out); opens no other file. Worth
# reading beside it: the README's section "What recall shows: a score must prefer equal tokens",
# `match_margins` in `minqkv/lab/analysis.py` and `_recall` in `minqkv/data.py`.
#
# The study's clearest finding: on associative recall, attention whose query and key are the
# input itself (Q = K = x, codes such as `---` or `--a`), or one tied matrix started large enough
# (`aab+wide-init`), learns the task, while canonical `abc` attention plateaus. This lesson shows
# why from the score alone: to answer, a query must score the key of an *equal* token above the
# others, and only some forms of the score do that from the start. We compute that preference,
# the **match margin**, by hand and check it against `match_margins`.

# %%
import argparse
import tempfile
from pathlib import Path

import numpy as np

from minqkv.data import load_corpus
from minqkv.lab.analysis import match_margins
from minqkv.model import GPT, GPTConfig
from minqkv.modifiers import parse

parser = argparse.ArgumentParser(description="Lesson 13: recall and the match margin")
parser.add_argument("--out", default=None, help="folder for the PNG (default: a temporary folder)")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson13-"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. The task
#
# `synthetic:recall` writes key-value pairs (a letter, then a digit), a `>`, then every key
# again in a random order, each followed by its value. Only the values after the `>` are scored,
# so chance is 1 in 10. To predict the digit after a queried key, a head at that key must find
# where the *same letter* stood before and read the digit that followed it.

# %%
corpus = load_corpus("synthetic:recall")
example = corpus.example(np.random.default_rng(0), 32)
print("one example (block 32):", example)
prompt, answer = example.split(">")[0], example.split(">")[1].rstrip(".")
value_of = dict(zip(prompt[0::2], prompt[1::2]))
assert all(value_of[key] == value for key, value in zip(answer[0::2], answer[1::2]))

# %% [markdown]
# ## 2. The score of two tokens, and the match margin
#
# In one head, a query token with input x (a row, after the layer's LayerNorm) scores a key
# token with input y by
#
#     s(x, y) = (x W_q)(y W_k)^T / sqrt(hd) = x W_q W_k^T y^T / sqrt(hd)
#
# where W_q, W_k are that head's columns (C, hd), or the identity for a '-' role. The **match
# margin** of a head, as `match_margins` defines it: feed every token's embedding alone (no
# position), and average over tokens i the score of the same token minus the mean score of the
# V - 1 other tokens:
#
#     margin = mean_i [ s(x_i, x_i) - mean_{j != i} s(x_i, x_j) ]
#
# (What recall needs in the end is stricter: s(x_i, x_i) above the *best* other score. We print
# that too.) A tiny float64 GPT, and the margin of layer 0 from its weights by hand:

# %%
V = corpus.tokenizer.vocab_size  # 38 characters
C, H = 32, 2
hd = C // H


def tiny_gpt(label: str, seed: int = 0) -> GPT:
    return GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=H, n_embd=C, dtype="float64",
                         seed=seed, **parse(label)))


def layer_norm(x, ln):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + ln.eps) * ln.weight.data + ln.bias.data


def token_scores(model: GPT, head: int) -> np.ndarray:
    """(V, V): s(x_i, x_j) of one head of layer 0, every token against every token."""
    block = model.blocks[0]
    x = layer_norm(model.token_embedding.weight.data, block.ln_1)  # (V, C): every token, normalised
    code = block.attn.spec.code
    w_q = block.attn.weight(code[0]).data if code[0] != "-" else np.eye(C)  # (C, C)
    w_k = block.attn.weight(code[1]).data if code[1] != "-" else np.eye(C)
    cols = slice(head * hd, (head + 1) * hd)
    q, k = x @ w_q[:, cols], x @ w_k[:, cols]  # (V, hd) each
    return q @ k.T / np.sqrt(hd)  # (V, hd) @ (hd, V) -> (V, V)


def margin_by_hand(S: np.ndarray) -> float:
    same = np.diag(S)  # (V,)
    others = (S.sum(axis=1) - same) / (V - 1)  # mean of the other V - 1 scores in each row
    return float(np.mean(same - others))


def best_other_margin(S: np.ndarray) -> float:
    """mean_i [ s(x_i, x_i) - max_{j != i} s(x_i, x_j) ]: positive when equal tokens win outright."""
    return float(np.mean(np.diag(S) - np.where(np.eye(V, dtype=bool), -np.inf, S).max(axis=1)))


model = tiny_gpt("abc")
by_hand = [margin_by_hand(token_scores(model, h)) for h in range(H)]
by_minqkv = match_margins(model)[0]
print(f"abc, layer 0: margins by hand {np.round(by_hand, 4)}, match_margins {np.round(by_minqkv, 4)}")
assert np.allclose(by_hand, by_minqkv, rtol=0, atol=1e-12)

# %% [markdown]
# ## 3. When is the margin positive for sure?
#
# Write u_i = x_i W_q and w_i = x_i W_k (rows of hd numbers). Averaging the definition over
# every pair, with m_u, m_w the means of the rows,
#
#     margin sqrt(hd) = V/(V-1) [ mean_i u_i . w_i  -  m_u . m_w ]
#
# **Tied or identity (W_q = W_k, so u = w):** this is V/(V-1) times mean_i |u_i - m_u|^2, the
# spread of the tokens' vectors: never negative, and zero only if every token looks the same. In
# matrix words, W W^T is positive semi-definite. For single pairs, x . x >= x . y whenever
# |x| >= |y| (Cauchy-Schwarz: x . y <= |x| |y|), with equality only for y = x; LayerNorm gives
# every whole row the same norm, so the identity score prefers the equal token, and its size is
# about |x_head|^2 / sqrt(hd) = sqrt(hd) logits.
#
# **Independent W_q and W_k:** u_i . w_i averages to zero over the draw of the weights (E[W_q
# W_k^T] = 0), so the margin is zero on average, positive or negative by chance; it must be
# *learned*. And GPT-2's init (std 0.02) scales a tied margin by C 0.02^2: positive but tiny.

# %%
labels = ["---", "aab+wide-init", "aab", "abc", "abc+wide-init", "abc+wide-init+sym-init"]
seeds = range(8)
margins = {label: np.array([np.mean(match_margins(tiny_gpt(label, s))[0]) for s in seeds]) for label in labels}
print("label                     mean margin over heads and 8 seeds   (min, max)")
for label, m in margins.items():
    print(f"{label:24}  {m.mean():+9.4f}   ({m.min():+.4f}, {m.max():+.4f})")


def spread_formula(model: GPT, head: int) -> float:
    """V/(V-1) mean_i |u_i - m_u|^2 / sqrt(hd): the margin of a tied or identity head."""
    block = model.blocks[0]
    x = layer_norm(model.token_embedding.weight.data, block.ln_1)
    w = block.attn.weight("a").data if block.attn.spec.code[0] != "-" else np.eye(C)
    u = (x @ w)[:, head * hd:(head + 1) * hd]  # (V, hd)
    return V / (V - 1) * float(np.mean(np.sum((u - u.mean(0)) ** 2, axis=1))) / np.sqrt(hd)


for label in ("---", "aab", "aab+wide-init"):
    m = tiny_gpt(label)
    assert np.allclose([spread_formula(m, h) for h in range(H)], match_margins(m)[0], rtol=1e-10, atol=0)
identity = tiny_gpt("---")
best = [best_other_margin(token_scores(identity, h)) for h in range(H)]
print(f"---: the equal token beats the best other token by {np.round(best, 2)} logits on average")
print(f"sqrt(hd) = {np.sqrt(hd):.2f}")

# %% [markdown]
# The identity and the wide tied matrix start about sqrt(hd) = 4 logits in favour of the equal
# token; the tied matrix at std 0.02 has the sign right but a size near C 0.02^2 sqrt(hd) = 0.05;
# canonical attention starts anywhere around 0, at either scale. Starting W_k as a copy of W_q
# (`sym-init`) makes a canonical head tied at step 0, so it starts where `aab+wide-init` does.
#
# In training (the README's `minqkv ablate --preset recall`, 2 layers, width 64, 16 pairs, 3000
# steps, about 15 minutes) this decides the outcome: `---` and `aab+wide-init` reach 0.99
# accuracy within about 1000 steps, `abc` and `abc+wide-init` plateau near 0.36, and `aab` at
# std 0.02 learns little. That run is too long for a lesson; run it yourself to see the curves.

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
for row, label in enumerate(labels):
    ax.plot(margins[label], np.full(len(seeds), row), "o", alpha=0.7)
ax.axvline(0.0, color="grey", lw=1)
ax.set_yticks(range(len(labels)), labels)
ax.invert_yaxis()
ax.set(xlabel="match margin at init, layer 0, mean over heads (logits)",
       title=f"does the score prefer equal tokens? ({len(seeds)} seeds each, hd = {hd})")
fig.savefig(out / "13_match_margins.png", dpi=100)
plt.close(fig)
print("wrote", out / "13_match_margins.png")

# %% [markdown]
# **What you learned:** recall needs a score that prefers equal tokens; the match margin
# measures that preference, and you computed it by hand from the embeddings, LayerNorm, W_q and
# W_k, equal to `match_margins`; with Q and K tied or the identity it is V/(V-1) times the
# spread of the tokens' vectors, never negative (about sqrt(hd) for the identity), while
# independent W_q and W_k start near zero and must learn the matching.

# %%
assert np.allclose(by_hand, by_minqkv, rtol=0, atol=1e-12)
assert margins["---"].min() > 0.5 * np.sqrt(hd)  # about sqrt(hd), every seed
assert margins["aab+wide-init"].min() > 0.5 * np.sqrt(hd)
assert margins["abc+wide-init+sym-init"].min() > 0.5 * np.sqrt(hd)
assert 0 < margins["aab"].max() < 0.2  # the right sign, too small to matter
assert all(b > 0 for b in best)  # identity: the equal token wins outright
assert abs(margins["abc"].mean()) < 0.05 and abs(margins["abc+wide-init"].mean()) < 1.0
assert margins["abc+wide-init"].min() < 0.5 * np.sqrt(hd)
assert (out / "13_match_margins.png").exists()
print("lesson 13 done")
