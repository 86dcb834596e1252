"""The training loop: batches in, AdamW steps out, with evaluation, metrics and checkpoints.

train(model_config, train_config) builds the corpus and the model, then for each step:
draw a batch, forward, loss (+ gate penalty), backward, clip, AdamW step. Every
eval_interval steps it scores the validation split on fixed batches, appends a JSON line to
OUT/metrics.jsonl and saves OUT/ckpt.npz atomically. A resumed run (resume_training)
reloads weights, optimiser, step and the random generators (batches, dropout, gate noise), so
it continues exactly as if never stopped; it refuses settings other than the saved run's and
data with another vocabulary.

One writer per run folder: a run holds folder_lock(OUT) while it writes there, so a second run
or a --resume beside a live one is refused with the live one's process id instead of mixing
metrics or deleting its temporary files. The folder is created only once every check has passed.
JSON files hold strict JSON (atomic.json_text): a figure that is not a finite number is null.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import ops
from .atomic import json_text, remove_leftovers, with_path, write_atomically
from .checkpoint import CHECKPOINT_NAME, checkpoint_path, load_checkpoint, save_checkpoint
from .data import load_corpus, tokenizer_from_dict
from .lock import folder_lock
from .model import GPT, GPTConfig
from .optim import AdamW, check_hyperparameters, clip_grad_norm, cosine_lr
from .tensor import no_grad


OPTIMIZER_FIELDS = ("lr", "beta1", "beta2", "weight_decay")  # checked by optim.check_hyperparameters


@dataclass
class TrainConfig:
    data: str = "shakespeare"
    out: str = "out"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    gate_penalty: float = 0.01  # gated models only: weight of the expected number of open gates
    gate_lr: float = 0.05  # gated models: peak learning rate of the gates' log-odds (same schedule)
    prune_threshold: float = 0.0  # gated models: a deterministic gate at or below this becomes the identity
    seed: int = 0

    def __post_init__(self):
        check_hyperparameters(**{name: getattr(self, name) for name in OPTIMIZER_FIELDS})
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name not in OPTIMIZER_FIELDS and isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number, got {value}")  # inf passes '> 0'
        for name in ("steps", "batch_size", "eval_interval", "eval_iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("lr", "gate_lr"):  # AdamW takes lr = 0; a run that learns needs more
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.gate_penalty < 0:
            raise ValueError(f"gate_penalty must be >= 0, got {self.gate_penalty}")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        if not 0 <= self.prune_threshold <= 1:
            raise ValueError(f"prune_threshold must be in [0, 1] (it is compared with gate "
                             f"values), got {self.prune_threshold}")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def evaluate(model: GPT, batches: list, metric: str) -> dict:
    """Mean loss over fixed batches; bits per character for text, answer accuracy for tasks."""
    losses, correct, counted = [], 0, 0
    with model.evaluating(), no_grad():
        for x, y in batches:
            logits, answers = model.scored_logits(x, y)  # (N, V), (N,): only the scored positions
            losses.append(float(ops.cross_entropy(logits, answers).data))
            correct += int((logits.data.argmax(-1) == answers).sum())
            counted += answers.size
    result = {"val_loss": float(np.mean(losses))}
    if metric == "accuracy":
        result["accuracy"] = correct / max(counted, 1)
    else:
        result["val_bpc"] = result["val_loss"] / math.log(2)
    return result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(model_config: GPTConfig, train_config: TrainConfig, corpus):
    """The model (sized to the corpus's vocabulary) and its optimiser.

    Gates get their own learning rate (they travel several units of log-odds), following the
    same schedule, and no weight decay (they are vectors).
    """
    model_config = replace(model_config, vocab_size=corpus.tokenizer.vocab_size)
    model = GPT(model_config)
    named = list(model.named_parameters())
    gate_scale = {name: train_config.gate_lr / train_config.lr for name, _ in named if _is_gate(name)}
    opt = AdamW(named, lr=train_config.lr, betas=(train_config.beta1, train_config.beta2),
                weight_decay=train_config.weight_decay, lr_scale=gate_scale)
    return model, opt


def _is_gate(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("gate_")  # 'blocks.0.attn.gate_q'


def train(model_config: GPTConfig, train_config: TrainConfig, resume: bool = False,
          progress: bool = True, on_step=None, corpus=None) -> dict:
    """Train (or resume) and return the final summary also written to OUT/final.json.

    With resume=True the configs must describe the run saved in train_config.out; only
    train_config.steps may differ, to extend it. on_step(step, loss) is called after every
    step (progress displays, tests).
    """
    if resume:
        model_settings = {k: v for k, v in asdict(model_config).items() if k != "vocab_size"}
        train_settings = {k: v for k, v in asdict(train_config).items() if k != "out"}
        return resume_training(train_config.out, model_settings, train_settings, progress, on_step, corpus)
    _check_out_folder(train_config.out)
    _refuse_a_used_folder(Path(train_config.out))
    return _run(model_config, train_config, None, progress, on_step, corpus)


def _check_out_folder(out) -> None:
    """--out names the run's folder: neither a file nor a path under one, and not a name ending
    in .npz (a checkpoint file's)."""
    out = Path(out)
    if out.suffix == ".npz":
        raise ValueError(f"--out {out} ends in .npz, like a checkpoint file, but --out names the run's "
                         f"folder (its checkpoint is FOLDER/{CHECKPOINT_NAME}): choose a name without .npz")
    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == out else f": {existing}"
        raise ValueError(f"--out {out}{where} is a file, not a folder: choose a folder for the run")


def _refuse_a_used_folder(out: Path) -> None:
    if checkpoint_path(out).exists():
        raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to "
                              "continue it, or choose another --out")


def resume_training(out, model_settings: dict | None = None, train_settings: dict | None = None,
                    progress: bool = True, on_step=None, corpus=None) -> dict:
    """Continue the run saved in `out` exactly where it stopped.

    model_settings and train_settings name GPTConfig and TrainConfig fields the caller asked
    for; each must equal the saved run's value, except 'steps', which may extend the run.
    """
    _check_out_folder(out)
    state = load_checkpoint(out)
    model_config, train_config = _resumed_configs(Path(out), state[0], model_settings or {},
                                                  train_settings or {})
    return _run(model_config, train_config, state, progress, on_step, corpus)


def _run(model_config: GPTConfig, train_config: TrainConfig, state, progress, on_step, corpus) -> dict:
    """Check and build everything, then train while holding the run folder's lock.

    `state` is a loaded checkpoint to continue, or None for a fresh run.
    """
    out = Path(train_config.out)
    corpus = corpus if corpus is not None else load_corpus(train_config.data, seed=train_config.seed)
    if state is not None:
        _check_vocabulary(corpus, state[0], out)
    model, opt = build(model_config, train_config, corpus)
    batch_rng = np.random.default_rng(train_config.seed)
    start = _restore(state, model, opt, batch_rng) if state is not None else 0
    eval_batches = corpus.eval_batches("val", train_config.batch_size, model.config.block_size,
                                       train_config.eval_iters, seed=train_config.seed)
    # a run resumed after its last step still reports the loss of that step
    train_loss = state[0].get("train_loss", math.nan) if state is not None else math.nan
    with folder_lock(out, "run folder"):  # creates the folder: only now, every check above has passed
        if state is None:
            _refuse_a_used_folder(out)  # again: another run may have finished here in the meantime
        else:
            for name in (CHECKPOINT_NAME, "metrics.jsonl", "final.json"):
                remove_leftovers(out / name)  # temporary files of writes a crash cut short
        _truncate_metrics(out / "metrics.jsonl", start)
        return _loop(model, opt, corpus, train_config, eval_batches, batch_rng, start, train_loss,
                     progress, on_step)


def _loop(model, opt, corpus, train_config, eval_batches, batch_rng, start, train_loss, progress,
          on_step) -> dict:
    """Steps start..steps with evaluations and checkpoints, then the summary in OUT/final.json."""
    out = Path(train_config.out)
    cfg = model.config
    params = model.parameters()
    step_ms, last_eval = [], {}
    wall_start = time.perf_counter()
    # closed however the loop ends, so that an error or Ctrl-C is reported on a line of its own
    with tqdm(range(start, train_config.steps), initial=start, total=train_config.steps,
              disable=not progress, desc=cfg.variant_label(), dynamic_ncols=True) as bar:
        for step in bar:
            t0 = time.perf_counter()
            train_loss, lr = _step(model, opt, params, corpus, train_config, batch_rng, step)
            step_ms.append(1000 * (time.perf_counter() - t0))
            tokens_per_s = train_config.batch_size * cfg.block_size / (step_ms[-1] / 1000)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            done = step + 1
            if done % train_config.eval_interval == 0 or done == train_config.steps:
                last_eval = evaluate(model, eval_batches, corpus.metric)
                record = {"step": done, "lr": lr, "train_loss": train_loss, **last_eval,
                          "tokens_per_s": tokens_per_s}
                if cfg.gate:
                    record["gates"] = {f"{layer}.{role}": g for (layer, role), g in model.gates().items()}
                _append_jsonl(out / "metrics.jsonl", record)
                meta = {**_meta(model, corpus, train_config, done, batch_rng), "train_loss": train_loss}
                save_checkpoint(out, model, opt, meta)
            if on_step is not None:
                on_step(done, train_loss)
    final = _final_record(model, train_config, train_loss, last_eval or
                     evaluate(model, eval_batches, corpus.metric), step_ms, wall_start)
    if cfg.gate:
        final.update(_prune_and_report(model, corpus, train_config, eval_batches, out, batch_rng))
    _write_json(out / "final.json", final)
    return final


def _step(model, opt, params, corpus, train_config, batch_rng, step) -> tuple:
    """One AdamW step on a fresh batch -> (train loss, learning rate).

    A loss or gradient norm that is not finite stops the run before the update reaches the weights.
    """
    cfg, out = model.config, train_config.out
    lr = cosine_lr(step, train_config.lr, train_config.min_lr,
                   min(train_config.warmup_steps, train_config.steps), train_config.steps)
    x, y = corpus.batch("train", train_config.batch_size, cfg.block_size, batch_rng)
    loss = model.loss(x, y)
    objective = loss
    if train_config.gate_penalty and cfg.gate:
        objective = loss + train_config.gate_penalty * model.gate_penalty()
    train_loss = float(loss.data)
    if not math.isfinite(train_loss):
        raise TrainingDiverged(f"loss became {train_loss} at step {step}; the last good "
                               f"checkpoint in {out} is kept (try a lower --lr)")
    model.zero_grad()
    objective.backward()
    grad_norm = clip_grad_norm(params, train_config.grad_clip)
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(f"gradient norm became {grad_norm} at step {step}; the last good "
                               f"checkpoint in {out} is kept (try a lower --lr)")
    opt.step(lr=lr)
    return train_loss, lr


def _final_record(model, train_config, train_loss, last_eval, step_ms, wall_start) -> dict:
    """What a run reports at its end (OUT/final.json): model, losses, speed and memory."""
    cfg = model.config
    return {
        "variant": cfg.variant_label(),
        "code": cfg.code if cfg.layer_codes is None else ",".join(cfg.layer_codes),
        "data": train_config.data,
        "params": model.num_parameters(),
        "attention_params": sum(b.attn.num_parameters() for b in model.blocks),
        "steps": train_config.steps,
        "train_loss": train_loss,
        **last_eval,
        **_speed(train_config, cfg, step_ms),
        "peak_rss_mb": peak_rss_mb(),
        "wall_s": time.perf_counter() - wall_start,
        "seed": train_config.seed,
    }


def _speed(train_config, cfg, step_ms: list) -> dict:
    """Median milliseconds per step and tokens per second.

    A resumed run that had no step left to take keeps the figures its final.json reported (None
    without one): it has timed nothing itself.
    """
    if not step_ms:
        return {key: _previous_final(train_config.out).get(key) for key in ("ms_per_step", "tokens_per_s")}
    median_ms = float(np.median(step_ms))
    return {"ms_per_step": median_ms,
            "tokens_per_s": train_config.batch_size * cfg.block_size / (median_ms / 1000)}


def _previous_final(out) -> dict:
    """OUT/final.json of an earlier pass of this run, or {} if there is none to read."""
    try:
        final = json.loads((Path(out) / "final.json").read_text())
    except (OSError, ValueError):
        return {}
    return final if isinstance(final, dict) else {}


def _prune_and_report(model, corpus, train_config, eval_batches, out: Path, batch_rng) -> dict:
    """Prune a gated model to static per-layer codes, score it, save it in OUT/pruned.

    Both scores use the deterministic gates; with every gate at exactly 0 or 1 the two models
    compute the same logits, so the losses agree up to rounding.
    """
    pruned = model.prune(train_config.prune_threshold)
    before = evaluate(model, eval_batches, corpus.metric)
    after = evaluate(pruned, eval_batches, corpus.metric)
    save_checkpoint(out / "pruned", pruned, None, _meta(pruned, corpus, train_config,
                                                         train_config.steps, batch_rng))
    return {
        "gates": {f"{layer}.{role}": g for (layer, role), g in model.gates().items()},
        "pruned_codes": pruned.config.layer_codes,
        "projections_kept": pruned.projections_kept(),
        "projections_total": model.projections_kept(),
        "pruned_params": pruned.num_parameters(),
        "val_loss_before_pruning": before["val_loss"],
        "val_loss_after_pruning": after["val_loss"],
        **({"accuracy_after_pruning": after["accuracy"]} if "accuracy" in after else
           {"val_bpc_after_pruning": after["val_bpc"]}),
    }


def _meta(model, corpus, train_config, step, batch_rng) -> dict:
    return {
        "model_config": model.config.to_dict(),
        "train_config": asdict(train_config),
        "tokenizer": corpus.tokenizer.to_dict(),
        "step": step,
        "batch_rng": batch_rng.bit_generator.state,
        "dropout_rng": model.dropout_rng.bit_generator.state,
        "gate_rng": model.gate_rng.bit_generator.state,
    }


def _resumed_configs(out: Path, meta: dict, model_settings: dict, train_settings: dict):
    """The saved run's configs, refusing any requested setting that differs (but steps)."""
    saved_model = GPTConfig.from_dict(meta["model_config"])
    saved_train = TrainConfig(**meta["train_config"])
    # replace() re-runs the checks and turns a name such as 'shared-kv' into its code 'abb'
    model_config = replace(saved_model, **model_settings)
    train_config = replace(saved_train, **train_settings, out=str(out))
    differences = _differences(saved_model, model_config, ignore=())
    differences += _differences(saved_train, train_config, ignore=("steps", "out"))
    differences = list(dict.fromkeys(differences))  # a seed that differs is in both configs
    if differences:
        raise ValueError(f"{out} holds a run with other settings, and a resumed run keeps its "
                         f"settings (only steps may change): " + "; ".join(differences))
    if train_config.steps < meta["step"]:
        raise ValueError(f"--steps {train_config.steps} is fewer than the {meta['step']} steps "
                         f"already done in {out}")
    return model_config, train_config


def _differences(saved, requested, ignore: tuple) -> list:
    saved, requested = asdict(saved), asdict(requested)
    return [f"{name} {requested[name]!r} (saved run: {saved[name]!r})"
            for name in saved if name not in ignore and requested[name] != saved[name]]


def _check_vocabulary(corpus, meta: dict, out: Path) -> None:
    """A checkpoint's ids mean the tokens of its own vocabulary; the data must have the same."""
    saved = tokenizer_from_dict(meta["tokenizer"])
    if corpus.tokenizer == saved:
        return
    if hasattr(saved, "chars") and hasattr(corpus.tokenizer, "chars"):
        only_data = sorted(set(corpus.tokenizer.chars) - set(saved.chars))
        only_saved = sorted(set(saved.chars) - set(corpus.tokenizer.chars))
        difference = (f"{corpus.tokenizer.vocab_size} characters against {saved.vocab_size}; only in the data: "
                      f"{''.join(only_data)!r}, only in the checkpoint: {''.join(only_saved)!r}")
    else:  # token ids (synthetic:mqar) on either side
        difference = f"{corpus.tokenizer!r} against the checkpoint's {saved!r}"
    raise ValueError(
        f"data {corpus.name!r} has another vocabulary than the checkpoint in {out} ({difference}), so "
        f"every id would mean another token: resume with the data the run was trained on")


def _restore(state, model, opt, batch_rng) -> int:
    """Load weights, optimiser and the random generators; -> the number of steps done."""
    meta, model_state, optim_state = state
    model.load_state_dict(model_state)
    opt.load_state_dict(optim_state)
    batch_rng.bit_generator.state = meta["batch_rng"]
    model.dropout_rng.bit_generator.state = meta["dropout_rng"]
    if "gate_rng" in meta:  # without it, the gates' noise starts from the seed
        model.gate_rng.bit_generator.state = meta["gate_rng"]
    return int(meta["step"])


def _append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json_text(record) + "\n")
    except OSError as error:
        raise with_path(error, path) from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric lines up to `step` (a resumed run rewrites what came after).

    A line without its newline was cut short by a crash; it is dropped with the rest. Any other
    line that is not a record stops the resume, naming the file and line.
    """
    if not path.exists():
        return
    whole_lines = path.read_text(errors="replace").split("\n")[:-1]
    kept = [line for number, line in enumerate(whole_lines, start=1)
            if line.strip() and _metric_step(path, number, line) <= step]
    write_atomically(path, "".join(line + "\n" for line in kept))


def _metric_step(path: Path, number: int, line: str) -> int:
    """The step of line `number` of metrics.jsonl."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        step = None
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{path}:{number} is not a metrics record (a JSON object with an integer "
                         f"'step'): delete or repair that line, then resume again")
    return step


def _write_json(path: Path, obj) -> None:
    write_atomically(path, json_text(obj, indent=2) + "\n")
