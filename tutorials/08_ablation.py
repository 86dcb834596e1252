# %% [markdown]
# # Lesson 8: an ablation, and when a difference is real
#
# Run: `python tutorials/08_ablation.py [--out FOLDER]` (times: tutorials/README.md). Draws
# `08_seeds.png`, and the bench's own `curves.png`, `final.png` and `tradeoff.png` in the
# `ablation/` subfolder. `--steps 1000 --seeds 3` (12 runs of five times the steps, in place of
# 8) gives the differences room to grow: there `abc` ends about 0.08 bits per character ahead
# of `abb` and 0.22 ahead of `aaa` and `---`, and the paired differences are 7 to 35 times their
# noise, although the spread of each variant over seeds (about 0.05) is not much smaller than
# the `abb` gap: pairing is what makes it clear.
#
# An **ablation** removes one part of a system, keeps everything else fixed, and measures what
# is lost. Here the part is a projection: does the model get worse when K and V share a weight
# (`abb`), when one weight serves Q, K and V (`aaa`), when nothing is projected (`---`)?
# minqkv's bench (`minqkv.lab.ablate`, or `minqkv ablate` in a shell) trains the variants side by
# side under identical settings and tabulates them. This lesson runs a small one and reads it.
#
# One Python detail first. The bench starts each training run in a fresh Python process with
# multiprocessing's *spawn* method, and a spawned process begins by importing the script that
# started it: this file. So every cell that does work sits under the standard guard
# `if __name__ == "__main__":`, true when you run the script (or a notebook) and false in those
# worker processes, which must not start a sweep of their own.

# %%
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from minqkv.lab import ablate, ablate_plots, ablate_tables

RUNNING = __name__ == "__main__"  # False in the bench's worker processes

# %% [markdown]
# ## 1. The plan
#
# A sweep is a **preset** (model and training settings shared by every run), the data, the
# variants, and a number of seeds. The bench's presets are `tiny` (for its own tests),
# `quick` (the README's short demonstration) and `standard` (the study, many times longer).
# For a lesson-sized sweep we add a smaller preset of our own to the bench's table:
# a one-layer model, 32 wide, on Shakespeare.
#
# `plan_sweep` checks everything before any training starts (a variant that cannot exist with
# these sizes fails here, with the reason) and lists the runs.

# %%
if RUNNING:
    parser = argparse.ArgumentParser(description="Lesson 8: an ablation")
    parser.add_argument("--out", default=None, help="folder for the sweep and the PNGs (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per variant (default 2)")
    parser.add_argument("--variants", default="abc,abb,aaa,---", help="comma-separated variant labels")
    args, _ = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson08-"))
    out.mkdir(parents=True, exist_ok=True)

    ablate.SWEEP_PRESETS["lesson"] = dict(
        model=dict(n_layer=1, n_head=4, n_embd=32, block_size=32),
        train=dict(steps=args.steps, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                   eval_interval=max(1, args.steps // 8), eval_iters=8),
        seeds=args.seeds,
    )
    plan = ablate.plan_sweep("lesson", "shakespeare", args.variants)
    print(f"{len(plan['runs'])} variants x {plan['seeds']} seeds; model {plan['model']}; "
          f"{plan['train']['steps']} steps of batch {plan['train']['batch_size']}")
    for run in plan["runs"]:
        print(f"  {run['label']:6} -> settings {run['overrides']}")

# %% [markdown]
# ## 2. Running it
#
# `run_sweep` trains every (variant, seed) pair in a fresh process, one after the other here
# (`jobs=1`: this machine has two cores; on a bigger one `jobs` runs several at once). Each
# finished run leaves `runs/VARIANT-seedS/result.json`, so running the same sweep again skips
# what is done and resumes what was interrupted. After training, each model also generates a
# few tokens with its KV cache, to measure decoding speed and cache size.
#
# A **seed** fixes all the randomness of a run: the initial weights, the order of the batches,
# dropout. With the same seed, two variants see exactly the same batches in the same order; a
# different seed is a different, equally valid, experiment.

# %%
if RUNNING:
    sweep_dir = out / "ablation"
    rows = ablate.run_sweep("lesson", "shakespeare", sweep_dir, args.variants, jobs=1, progress=False)
    print(ablate_tables.format_markdown(rows, plan))

# %% [markdown]
# ## 3. Reading the table
#
# * **attn params**: the attention weights of all layers; `abb` saves one C x C matrix per
#   layer, `aaa` two, `---` three (lesson 5). **params** is the whole model: embeddings and MLPs
#   are untouched, so the relative saving is smaller there.
# * **val bpc**: validation bits per character, mean ± standard deviation over the seeds. Lower
#   is better. **Δ vs abc** is the difference of the means from the canonical model.
# * **train tokens/s**, **decode ms/token**: speed (noisy on a shared machine); **KV bytes/token**:
#   the cache of lesson 6, measured on the trained model.
#
# The bench also draws the validation curves (every seed: seed 0 thick and named in the legend,
# the others thin, in the same colour), the final metric with its spread, and parameters
# against quality:

# %%
if RUNNING:
    for path in ablate_plots.write_plots(sweep_dir, rows):
        print("wrote", path)

# %% [markdown]
# ## 4. What counts as a real difference
#
# Two runs of the *same* variant with different seeds do not give the same number. That spread
# is the noise every comparison must beat. Some rules of thumb:
#
# * Compare a difference between variants with the spread between seeds. A difference smaller
#   than the seed-to-seed spread is not evidence of anything.
# * The mean of n seeds is uncertain by about std / sqrt(n); the difference of two such means by
#   sqrt(std_a^2 / n + std_b^2 / n). Two or three times that is a reasonable bar.
# * Because each seed gives every variant the same batches, the per-seed difference
#   (abb seed 0 minus abc seed 0, ...) cancels part of the noise: a **paired** comparison. Its
#   uncertainty is the spread of those differences divided by sqrt(n).
# * With 2 seeds every std is itself a rough guess (from two numbers!), so even "three times
#   the noise" is a weak bar: more seeds (`--seeds`) make the figures firmer, longer runs
#   (`--steps`) make real differences larger.
#
# Each run's own result is in its folder; here is every seed, side by side, and the paired
# difference from `abc` with its uncertainty:

# %%
if RUNNING:
    per_seed = {}
    for row in rows:
        per_seed[row["variant"]] = np.array([
            json.loads((sweep_dir / "runs" / f"{row['variant']}-seed{s}" / "result.json").read_text())["val_bpc"]
            for s in range(plan["seeds"])])
    base = per_seed.get("abc")
    print(f"{'variant':8} {'bpc per seed':24} {'mean':>6} {'std':>6}   paired diff vs abc")
    for variant, values in per_seed.items():
        spread = values.std(ddof=1) if len(values) > 1 else 0.0
        line = f"{variant:8} {' '.join(f'{v:.3f}' for v in values):24} {values.mean():6.3f} {spread:6.3f}"
        if base is not None and variant != "abc" and len(values) > 1:
            diffs = values - base  # same seed, same batches: paired
            noise = diffs.std(ddof=1) / np.sqrt(len(diffs))
            verdict = "larger than 3x the noise" if abs(diffs.mean()) > 3 * noise else "within the noise"
            line += f"   {diffs.mean():+.3f} ± {noise:.3f}: {verdict}"
        print(line)

# %%
if RUNNING:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (variant, values) in enumerate(per_seed.items()):
        ax.scatter(np.full(len(values), i), values, color="tab:blue", alpha=0.7, label="one seed" if i == 0 else None)
        ax.errorbar(i + 0.15, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0,
                    fmt="o", color="tab:red", capsize=4, label="mean ± std" if i == 0 else None)
    ax.set_xticks(range(len(per_seed)), list(per_seed))
    ax.set(ylabel="validation bits per character", title=f"{plan['seeds']} seeds per variant, {args.steps} steps")
    ax.legend()
    fig.savefig(out / "08_seeds.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    print("wrote", out / "08_seeds.png")

# %% [markdown]
# Read the picture and the table together: where the blue dots of two variants overlap, the
# seed alone moves the result as much as the variant does. With the default 200 steps the
# models have only learned which characters and pairs are common, and the variants that keep
# some projection sit close together; which differences pass the bar is the thing to read off
# the table above, not to assume. A short run can even put `---` ahead of `abc`: a model with
# fewer weights to fit learns faster at first, which says nothing about where training ends.
#
# **What you learned:** an ablation trains variants under identical settings; the table gives
# cost (parameters, cache, speed) next to quality; a difference counts only when it is clearly
# larger than what changing the seed alone does.

# %%
if RUNNING:
    by_variant = {row["variant"]: row for row in rows}
    assert all(row["seeds"] == plan["seeds"] and row["failed"] == 0 for row in rows)
    if {"abc", "abb", "aaa", "---"} <= set(by_variant):  # tying or dropping projections saves parameters
        params = [by_variant[v]["attention_params"] for v in ("abc", "abb", "aaa", "---")]
        assert params == sorted(params, reverse=True) and len(set(params)) == 4
        assert by_variant["abb"]["kv_cache_bytes_per_token"] * 2 == by_variant["abc"]["kv_cache_bytes_per_token"]
    assert all(values.std() > 0 for values in per_seed.values()) or plan["seeds"] == 1  # seeds differ
    assert (out / "08_seeds.png").exists() and (sweep_dir / "curves.png").exists()
    print("lesson 8 done")
