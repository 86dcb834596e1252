"""Lesson 3: train a tiny model with gated projections, then prune it.

Run: python tutorials/03_train_and_prune.py   (about half a minute on 2 cores)

Each projection is mixed with the identity by a learned gate g: g (x W) + (1 - g) x.
A small penalty on the gates pushes unneeded projections towards the identity; prune()
then turns the model into a static one whose layers may each end with a different code.
"""

import tempfile

from minqkv.model import GPTConfig
from minqkv.train import TrainConfig, train

with tempfile.TemporaryDirectory() as out:
    final = train(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, gate=True),
        TrainConfig(data="synthetic:copy", out=out, steps=300, batch_size=32, lr=1e-2,
                    warmup_steps=20, eval_interval=100, eval_iters=4, gate_penalty=0.003),
        progress=False,
    )
print("answer accuracy on the copy task:", round(final["accuracy"], 3))
print("gates after training:", {k: round(v, 2) for k, v in final["gates"].items()})
print("per-layer codes after pruning:", final["pruned_codes"])
print(f"val loss before pruning {final['val_loss_before_pruning']:.4f}, "
      f"after {final['val_loss_after_pruning']:.4f}")
