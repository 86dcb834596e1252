"""One run of a sweep: train one (variant, seed) in its folder, measure it, save result.json.

A sweep (ablate.py) starts run_one in a fresh process for each run, on this machine or on a
Dask worker (cluster.py). A run folder OUT/runs/VARIANT-seedSEED holds what train() writes
(checkpoints, metrics.jsonl, final.json) and, last, result.json: the run's figures with
status 'ok', or status 'failed' and the error. A folder with an 'ok' result.json is finished.

A job may list multiples of the block size to evaluate at (job["extrapolation"], e.g. [2, 4]): the
result then holds val_loss_2x, val_loss_4x, the validation loss on sequences that much longer than
any seen in training, for models whose positions need no table (model.TABLE_FREE_POSITIONS, no
pos2d); a learned position table has no rows past block_size, so those get None.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

# Nothing that builds or trains a model is imported here, only inside the functions: a Dask worker
# imports this module (through cluster.py) to check its install, and that must work even where
# the kernels would refuse to load (e.g. a bad MINQKV_NUM_THREADS, which the run then reports).
from ..atomic import json_text, write_atomically

ATTEMPTS = 2  # a run is tried once more: locally when its process is lost, on Dask when it fails or is lost
RUN_DECODE_TOKENS = 32  # tokens a finished run generates, after a prompt of at most 8, to time its decoding


def run_folder(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{variant}-seed{seed}"


def saved_result(run_dir: Path):
    """The run's result.json, or None when it has saved none."""
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_one(job: dict, progress_queue=None, corpus=None) -> dict:
    """Train one (variant, seed), measure decoding, save run_dir/result.json; never raises.

    corpus, when given, is the already loaded data named job["data"] (a Dask worker gets the text, not the file).
    """
    run_dir = Path(job["run_dir"])
    key = f"{job['variant']} seed {job['seed']}"
    try:
        from ..checkpoint import checkpoint_path
        from ..model import GPTConfig
        from ..train import TrainConfig, train

        model_config = GPTConfig(**{**job["model"], **job["overrides"], "seed": job["seed"]})
        train_config = TrainConfig(**{**job["train"], **job.get("train_overrides", {}), "data": job["data"],
                                      "out": str(run_dir), "seed": job["seed"]})

        parent = os.getppid()

        def report(step, loss):
            if os.getppid() != parent:  # the sweep was killed: stop too (the checkpoint stays)
                raise SystemExit(f"{key}: the sweep that started this run is gone")
            if progress_queue is not None:
                progress_queue.put((key, step))

        # a run that trained to the end keeps the figures it measured (only result.json was lost);
        # an interrupted one continues from its checkpoint
        final = _final_if_finished(run_dir, train_config.steps)
        if final is None:
            resume = checkpoint_path(run_dir).exists()
            final = train(model_config, train_config, resume=resume, progress=False, on_step=report,
                          corpus=corpus)
        measured_dir = run_dir / "pruned" if model_config.gate else run_dir
        # sizes, FLOPs and decoding are measured on the model as deployed (pruned if gated)
        result = {**final, **measure_decoding(measured_dir), "eval_curve": _eval_curve(run_dir),
                  **extrapolation_losses(measured_dir, job.get("extrapolation", []), train_config, corpus),
                  "status": "ok"}
        if model_config.gate:  # the row reports the pruned model
            result["unpruned_val_loss"] = final["val_loss"]
            result["val_loss"] = final["val_loss_after_pruning"]
            for metric in ("val_bpc", "accuracy"):
                if f"{metric}_after_pruning" in final:
                    result[metric] = final[f"{metric}_after_pruning"]
            result["code"] = ",".join(final["pruned_codes"])
    except Exception as e:  # recorded, and the sweep goes on
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    result.update(label=job["label"], variant=job["variant"], seed=job["seed"])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / "result.json", json_text(result, indent=2) + "\n")
    return result


def _final_if_finished(run_dir: Path, steps: int):
    """The run's final.json if it trained all `steps`, else None."""
    path = run_dir / "final.json"
    if not path.exists():
        return None
    final = json.loads(path.read_text())
    return final if final.get("steps") == steps else None


def _eval_curve(run_dir: Path) -> list:
    """[[step, val_loss], ...] of a finished run, from its metrics (a gated run: before pruning)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [[record["step"], record["val_loss"]] for record in map(json.loads, filter(str.strip, lines))]


def extrapolation_losses(ckpt_dir, multiples, train_config, corpus=None) -> dict:
    """{'val_loss_2x': loss, ...}: the validation loss on sequences `multiple` x block_size long
    (as many batches as the run's evaluations); None for a model that cannot read them."""
    if not multiples:
        return {}
    from ..checkpoint import load_model
    from ..data import load_corpus
    from ..model import TABLE_FREE_POSITIONS
    from ..train import evaluate

    model, _, _ = load_model(ckpt_dir)
    config = model.config
    if config.pos not in TABLE_FREE_POSITIONS or config.pos2d:
        return {f"val_loss_{m}x": None for m in multiples}
    corpus = corpus if corpus is not None else load_corpus(train_config.data, seed=train_config.seed)
    losses = {}
    for multiple in multiples:
        batches = corpus.eval_batches("val", train_config.batch_size, multiple * config.block_size,
                                      train_config.eval_iters, seed=train_config.seed)
        losses[f"val_loss_{multiple}x"] = evaluate(model, batches, corpus.metric)["val_loss"]
    return losses


def measure_decoding(ckpt_dir) -> dict:
    """Milliseconds per generated token with the KV cache, the cache's bytes per token, FLOPs."""
    from ..checkpoint import load_model
    from ..tensor import no_grad

    model, _, _ = load_model(ckpt_dir)
    prompt_len = max(1, min(8, model.config.block_size - RUN_DECODE_TOKENS))
    steps = min(RUN_DECODE_TOKENS, model.config.block_size - prompt_len)
    ids = np.zeros((1, prompt_len), dtype=np.int64)
    caches = model.new_caches()
    timings = []
    with model.evaluating(), no_grad():
        logits, _ = model(ids, caches=caches)
        for _ in range(steps):
            next_id = logits.data[:, -1:].argmax(-1)  # (1, 1)
            t0 = time.perf_counter()
            logits, _ = model(next_id, caches=caches)
            timings.append(time.perf_counter() - t0)
    itemsize = np.dtype(model.config.dtype).itemsize
    return {"params": model.num_parameters(), "projections_kept": model.projections_kept(),
            "attention_params": sum(block.attn.num_parameters() for block in model.blocks),
            "flops_per_token": model.flops_per_token(),
            "decode_ms_per_token": 1000 * float(np.median(timings)),
            "kv_cache_bytes_per_token": sum(c.floats_per_token() for c in caches) * itemsize}
