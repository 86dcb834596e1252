# %% [markdown]
# # Lesson 9: gates that decide, and pruning that costs nothing
#
# Run: `python tutorials/09_gates_and_pruning.py [--out FOLDER]` (times: tutorials/README.md). Draws
# `gates.png`.
#
# Does every layer need its Q, K and V projections? A gated model lets training answer per layer
# and per role: `role = z (x W) + (1 - z) x`, where z = 1 keeps the projection and z = 0 replaces
# it by the input itself. We want z to end *exactly* 0 or 1, so that the decision is real and
# pruning changes nothing. The hard-concrete gate of Louizos, Welling & Kingma (2018) does that.

# %%
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from minqkv.attention import hard_concrete, probability_open
from minqkv.checkpoint import load_model
from minqkv.model import GPTConfig
from minqkv.tensor import Tensor, no_grad
from minqkv.train import TrainConfig, train

parser = argparse.ArgumentParser(description="Lesson 9: gates and pruning")
parser.add_argument("--out", default=None, help="folder for the run and the plot (default: a temporary one)")
args, _ = parser.parse_known_args()  # known args only: a Jupyter kernel passes arguments of its own
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson09-"))
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The gate
#
# Each gate has one learned number, its log-odds log_alpha. At evaluation the gate is
# `z = clip(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)`: the sigmoid is stretched to (-0.1, 1.1) and
# clipped, so beyond log_alpha = +-2.4 the gate is exactly 0 or exactly 1. In training, logistic
# noise is added to log_alpha first (a fresh draw each step), so even a gate that is shut is
# sometimes tried open, and the loss can argue for it.

# %%
log_alphas = Tensor(np.array([-4.0, -1.0, 0.0, 1.0, 4.0]))
print("log_alpha        ", log_alphas.data)
print("z at evaluation  ", hard_concrete(log_alphas).data.round(3))
noise = np.random.default_rng(3).uniform(1e-6, 1, size=5)
print("z, one noisy draw", hard_concrete(log_alphas, noise).data.round(3))
print("P(z > 0)         ", probability_open(log_alphas).data.round(3))

# %% [markdown]
# The penalty is the expected number of open gates, the sum of P(z > 0). Added to the loss with a
# weight L, it closes the projections whose absence costs less than L; the gates get their own
# learning rate (`gate_lr`), because they must travel several units of log-odds.
#
# ## Training a gated model
#
# A small GPT on the copy task (repeat the prompt), every layer starting from the canonical
# code `abc` with its gates open. Every 10 steps the trainer writes the gates to `metrics.jsonl`.

# %%
final = train(
    GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, code="abc", gate=True),
    TrainConfig(data="synthetic:copy", out=str(out / "run"), steps=500, batch_size=32, lr=1e-2,
                min_lr=1e-3, warmup_steps=20, eval_interval=10, eval_iters=4, gate_penalty=0.01,
                gate_lr=0.05),
    progress=False,
)
print("answer accuracy on the copy task:", round(final["accuracy"], 3))
print("gates after training:", final["gates"])
print("per-layer codes after pruning:", final["pruned_codes"],
      f"({final['projections_kept']} of {final['projections_total']} projection matrices kept)")

# %% [markdown]
# Every gate ended exactly open (1.0) or shut (0.0): each one is a decision, not a blend.

# %%
decided = [g for g in final["gates"].values() if g in (0.0, 1.0)]
print(f"{len(decided)} of {len(final['gates'])} gates decided")

# %% [markdown]
# ## Pruning costs nothing
#
# `prune()` turns each shut role into the identity (no weight at all), each open one into its
# plain weight, and folds a gate in between into `z W + (1 - z) I`. The pruned model is an
# ordinary static model whose layers have their own codes, and its logits are the gated
# model's deterministic logits.

# %%
gated, _, _ = load_model(out / "run")
pruned = gated.prune()
ids = np.random.default_rng(1).integers(0, gated.config.vocab_size, (4, gated.config.block_size))
with no_grad(), gated.evaluating(), pruned.evaluating():
    gated_logits, pruned_logits = gated(ids)[0].data, pruned(ids)[0].data
np.testing.assert_allclose(pruned_logits, gated_logits, rtol=0, atol=1e-5)
print("largest logit difference, pruned against gated:", float(np.abs(pruned_logits - gated_logits).max()))
print(f"parameters: {gated.num_parameters():,} gated, {pruned.num_parameters():,} pruned")
print(f"val loss before pruning {final['val_loss_before_pruning']:.4f}, "
      f"after {final['val_loss_after_pruning']:.4f}")

# %% [markdown]
# ## Watching the decisions
#
# The gate trajectories, one panel per gate (a row per layer, a column per role), so that
# gates on the same value never hide each other: every gate starts open; the penalty pushes,
# the loss pushes back, and each one lands on 0 or 1.

# %%
records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
steps = [r["step"] for r in records]
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("no plot: pip install matplotlib")
else:
    names = list(records[0]["gates"])  # "layer.role", e.g. "0.q"
    layers = sorted({name.split(".")[0] for name in names}, key=int)
    roles = [role for role in "qkv" if any(name.endswith("." + role) for name in names)]
    fig, axes = plt.subplots(len(layers), len(roles), figsize=(3 * len(roles), 2.2 * len(layers)),
                             sharex=True, sharey=True, layout="constrained", squeeze=False)
    for name in names:
        layer, role = name.split(".")
        ax = axes[layers.index(layer), roles.index(role)]
        z = [r["gates"][name] for r in records]
        ax.plot(steps, z, color="tab:blue")
        ax.set_title(f"layer {layer}, {role.upper()}: ends {'open' if z[-1] == 1 else 'shut' if z[-1] == 0 else z[-1]}",
                     fontsize=10)
    for ax in axes.flat:
        ax.set(ylim=(-0.08, 1.08), yticks=[0, 0.5, 1])
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("gate z")
    fig.suptitle("hard-concrete gates deciding (z at evaluation, true values)")
    fig.savefig(out / "gates.png", dpi=110)
    plt.close(fig)
    print("gate trajectories:", out / "gates.png")

# %% [markdown]
# **What you learned:** a hard-concrete gate is exactly 0 or 1 once its log-odds pass +-2.4;
# the penalty on the expected number of open gates makes training decide, per layer and per
# role, which projections to keep; and pruning the decided model changes none of its logits.

# %%
assert all(g in (0.0, 1.0) for g in final["gates"].values()), "every gate should end exactly open or shut"
assert final["projections_kept"] == sum(g == 1.0 for g in final["gates"].values())
assert final["projections_kept"] < final["projections_total"], "the penalty should have shut some gate"
assert pruned.num_parameters() < gated.num_parameters()
assert np.abs(pruned_logits - gated_logits).max() <= 1e-5
assert abs(final["val_loss_after_pruning"] - final["val_loss_before_pruning"]) < 1e-4
print("lesson 9 done")
