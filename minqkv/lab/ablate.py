"""The ablation bench: train many attention variants under identical settings and compare them.

run_sweep() trains every (variant, seed) pair in a fresh process (so each run's peak memory
is its own and runs can go in parallel), saves each finished run as it finishes, and then
writes OUT/results.csv, OUT/results.json and OUT/results.md (and plots when matplotlib is
installed).

What a sweep folder promises:
- one writer: a sweep holds a lock on OUT while it runs; a second sweep on OUT is refused;
- one folder per variant: labels that name the same model at the preset's sizes (at 2 heads,
  'canonical+gqa2' is 'abc') run once, in a folder named by the variant, never twice;
- no result overwritten: a run with an 'ok' OUT/runs/*/result.json is never trained again;
- interrupted sweeps resume: Ctrl-C cancels the queued runs and stops the running ones, which
  keep their checkpoints; the same command again continues them;
- failed runs are retried: a run recorded as failed trains again when the sweep is re-run,
  and a run whose process is lost (killed) is tried once more at once;
- every JSON file is standard JSON: a figure that could not be measured is null, never NaN.

A preset may sweep the gate penalty L: every gated variant then runs once per L, named
'abc+gate(L=0.01)', and is compared with static variants by the projection matrices it keeps.
Every table reports how fast each run converges: the first evaluated step whose validation
loss is within 5% of canonical's final loss.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import json_text, write_atomically
from ..attention import ALL_CODES
from .cluster import ATTEMPTS
from ..lock import folder_lock
from ..model import GPTConfig
from ..train import TrainConfig

# The study's selection: what the literature compares (the README's variants table names the sources).
STUDY_VARIANTS = ["canonical", "shared-qk", "shared-kv", "single", "single+rotate", "value-only",
                  "none", "no-query", "no-value", "canonical+gate", "canonical+gqa2",
                  "canonical+mqa", "shared-kv+gqa2", "shared-kv+mqa"]

# Beyond the study: the attention designs of today's models next to the projection codes. Each
# code with learned and rotary positions; output gates; latent keys and values at the cache of
# abb (R = n_embd = 96 floats per token and layer, abb's one C-wide tensor; at R = C the latent is
# not low-rank: K and V may be any two matrices, as in abc, but share abb's cache); and MQA.
MODERN_VARIANTS = ["abc", "abb", "aab", "-ab", "abc+rope", "abb+rope", "aab+rope", "-ab+rope",
                   "abc+out-gate", "abc+latent-kv96", "abc+mqa"]
# long enough for variant differences to exceed seed noise on Shakespeare (30 minutes
# with --jobs 2 on 2 cores for the study's 14 variants x 2 seeds)
STANDARD = dict(model=dict(n_layer=3, n_head=4, n_embd=96, block_size=96),
                train=dict(steps=800, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=80,
                           eval_interval=100, eval_iters=16), seeds=2)

PRESETS = {
    # about 5 minutes on 2 cores: the README's demonstration
    "quick": dict(model=dict(n_layer=2, n_head=4, n_embd=64, block_size=64),
                  train=dict(steps=400, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=40,
                             eval_interval=100, eval_iters=8), seeds=1),
    "standard": STANDARD,
    # the standard settings for the 11 variants above x 2 seeds: 22 runs. Its heaviest run (abc+latent-kv96)
    # took 136 s of CPU (4 minutes of wall time on a machine loaded 4x over), so about 25 minutes with --jobs 2
    "modern": dict(STANDARD, variants=",".join(MODERN_VARIANTS)),
    # nanoGPT's CPU shape: gated runs for a sweep of L against static variants with the same
    # budget of projection matrices (8/12: aab, abb; 4/12: aaa, --a); measured on an idle 2-core
    # machine with --jobs 2: about 80 ms a step, 4 minutes a run, so about 20 minutes per seed
    "prune": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
                  train=dict(steps=2000, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                             eval_interval=100, eval_iters=20),
                  seeds=2, variants="abc,aab,abb,aaa,--a,abc+gate",
                  gate_penalties=[0.003, 0.01, 0.03, 0.1]),
    # multi-query associative recall (synthetic:recall): which projections can learn to match a
    # token with an equal one? The README's recall section; about 15 minutes with --jobs 2
    "recall": dict(model=dict(n_layer=2, n_head=4, n_embd=64, block_size=64),
                   train=dict(steps=3000, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=100,
                              eval_interval=100, eval_iters=8),
                   seeds=2, data="synthetic:recall",
                   variants="abc,---,aab,aab+wide-init,abc+wide-init,abc+wide-init+sym-init"),
    # seconds: for tests of the bench itself
    "tiny": dict(model=dict(n_layer=1, n_head=2, n_embd=16, block_size=16),
                 train=dict(steps=10, batch_size=4, eval_interval=5, eval_iters=2), seeds=1),
}
CONVERGED = 1.05  # a run has converged at the first step whose val loss <= CONVERGED x canonical's final
DECODE_TOKENS = 32  # tokens generated to time decoding with the KV cache


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C (its __cause__: the interrupt); the message says what was kept
    and how to resume, in one line."""


# ---- planning: everything is checked before any training starts --------------------------


def selected_labels(variants) -> list:
    """'study' (default), 'all' (the 15 codes), or a comma-separated list of labels."""
    if variants in (None, "", "study"):
        return list(STUDY_VARIANTS)
    if variants == "all":
        return list(ALL_CODES)
    labels = [v.strip() for v in variants.split(",") if v.strip()]
    if not labels:
        raise ValueError("--variants is empty: give labels such as 'abc,abb,aaa+rotate', 'study' or 'all'")
    return labels


def plan_sweep(preset: str, data: str | None, variants=None, seeds: int | None = None) -> dict:
    """Every run of a sweep; variants=None takes the preset's own list (else the study's),
    data=None the preset's own data (else Shakespeare).

    Each label is normalised to its variant at the preset's sizes; a label that names a variant
    already listed runs once (the first label is kept), and plan["notes"] says so.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    data = data or spec.get("data", "shakespeare")
    seeds = spec["seeds"] if seeds is None else seeds
    if seeds <= 0:
        raise ValueError(f"--seeds must be a positive integer, got {seeds}")
    runs, notes, first_label = [], [], {}
    for label in selected_labels(spec.get("variants") if variants is None else variants):
        run = _planned_run(label, spec["model"], preset)
        if run["variant"] in first_label:
            notes.append(_same_variant_note(label, first_label[run["variant"]], run, spec["model"]))
            continue
        first_label[run["variant"]] = label
        if run["overrides"].get("gate") and spec.get("gate_penalties"):
            runs += [{**run, "variant": f"{run['variant']}(L={L:g})", "train_overrides": {"gate_penalty": L}}
                     for L in spec["gate_penalties"]]
        else:
            runs.append(run)
    return {"preset": preset, "data": data, "seeds": seeds, "runs": runs,
            "model": spec["model"], "train": spec["train"], "notes": notes}


def _planned_run(label: str, model: dict, preset: str) -> dict:
    """{label, variant, overrides}; the variant is the label as the model at these sizes names itself."""
    overrides = GPTConfig.overrides_from_label(label)
    if overrides.get("n_kv_head") and model["n_head"] % overrides["n_kv_head"]:
        raise ValueError(f"{label!r}: n_kv_head={overrides['n_kv_head']} does not divide "
                         f"n_head={model['n_head']} of preset {preset!r}")
    config = GPTConfig(**{**model, **overrides})  # raises on impossible variants
    return {"label": label, "variant": config.variant_label(), "overrides": overrides}


def _same_variant_note(label: str, first: str, run: dict, model: dict) -> str:
    if label == first:
        return f"{label!r} is listed more than once: it runs once"
    at = f" at n_head={model['n_head']}" if "n_kv_head" in run["overrides"] else ""
    return f"{label!r} is the same variant as {first!r} ({run['variant']}){at}: it runs once"


def _run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / f"{variant}-seed{seed}"


def _check_sweep_file(out: Path, plan: dict) -> None:
    """An output folder belongs to one sweep; refuse to mix results of different settings."""
    path = out / "sweep.json"
    settings = {key: value for key, value in plan.items() if key != "notes"}  # notes describe the command
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != settings:
            raise ValueError(f"{out} holds a different sweep (see {path}); choose another --out "
                             "or delete that folder")
    else:
        write_atomically(path, json_text(settings, indent=2) + "\n")


# ---- one run, in its own process ----------------------------------------------------------


def run_one(job: dict, progress_queue=None, corpus=None) -> dict:
    """Train one (variant, seed), measure decoding, save run_dir/result.json; never raises.

    corpus, when given, is the already loaded data named job["data"] (a Dask worker gets the text, not the file).
    """
    run_dir = Path(job["run_dir"])
    key = f"{job['variant']} seed {job['seed']}"
    try:
        from ..checkpoint import checkpoint_path
        from ..train import train

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
        final = _finished_summary(run_dir, train_config.steps)
        if final is None:
            resume = checkpoint_path(run_dir).exists()
            final = train(model_config, train_config, resume=resume, progress=False, on_step=report,
                          corpus=corpus)
        measured_dir = run_dir / "pruned" if model_config.gate else run_dir
        # sizes, FLOPs and decoding are measured on the model as deployed (pruned if gated)
        result = {**final, **measure_decoding(measured_dir), "eval_curve": _eval_curve(run_dir),
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


def _finished_summary(run_dir: Path, steps: int):
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


def measure_decoding(ckpt_dir) -> dict:
    """Milliseconds per generated token with the KV cache, the cache's bytes per token, FLOPs."""
    from ..checkpoint import load_model
    from ..tensor import no_grad

    model, _, _ = load_model(ckpt_dir)
    prompt_len = max(1, min(8, model.config.block_size - DECODE_TOKENS))
    steps = min(DECODE_TOKENS, model.config.block_size - prompt_len)
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


# ---- the sweep ----------------------------------------------------------------------------


def run_sweep(preset: str, data: str | None, out, variants=None, seeds: int | None = None,
              jobs: int = 1, progress: bool = True, dask=None) -> list:
    """Run (or finish) a sweep and write its tables; returns the aggregated rows.

    Raises FolderBusy while another sweep writes `out`, SweepInterrupted on Ctrl-C.
    """
    if jobs <= 0:
        raise ValueError(f"--jobs must be a positive integer, got {jobs}")
    plan = plan_sweep(preset, data, variants, seeds)
    from ..data import load_corpus
    load_corpus(plan["data"])  # a bad --data fails here, before any training (and Shakespeare is cached)
    if progress:
        for note in plan["notes"]:
            print(f"note: {note}", file=sys.stderr)
    out = Path(out)
    # the runs train in folders below out, each locked by its own training process
    with folder_lock(out, "sweep folder"):
        _check_sweep_file(out, plan)
        results, jobs_todo = _done_and_todo(out, plan)
        try:
            if dask is not None:  # a Dask scheduler's address, or 'local' (see cluster.py)
                from .cluster import run_on_cluster
                results += run_on_cluster(dask, jobs_todo, jobs, plan["train"]["steps"], progress)
            else:
                results += _execute(jobs_todo, jobs, plan["train"]["steps"], progress)
        except KeyboardInterrupt as stop:  # Ctrl-C, or whatever the caller turned into one (SIGTERM)
            raise SweepInterrupted(f"interrupted; the finished runs are saved in {out / 'runs'} and the "
                                   "others keep their last checkpoint: run the same command again to "
                                   "resume") from stop
        rows = aggregate(results, plan)
        write_results(out, rows, plan)
    return rows


def _done_and_todo(out: Path, plan: dict) -> tuple:
    """(the results of the finished runs, a job for every other run); a failed run is done again."""
    done, todo = [], []
    for run in plan["runs"]:
        for seed in range(plan["seeds"]):
            run_dir = _run_dir(out, run["variant"], seed)
            result = _saved_result(run_dir)
            if result is not None and result["status"] == "ok":
                done.append(result)
            else:
                todo.append({**run, "seed": seed, "run_dir": str(run_dir), "data": plan["data"],
                             "model": plan["model"], "train": plan["train"]})
    return done, todo


def _saved_result(run_dir: Path):
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---- local processes: at most --jobs at once, each run in a fresh one -------------------------


def _execute(jobs_todo: list, n_jobs: int, steps: int, progress: bool) -> list:
    """Train the jobs, at most n_jobs at once; -> their result records.

    A run whose process dies before saving a result (killed) is started again, once. On Ctrl-C
    the queued runs never start and the running processes are stopped; their checkpoints stay.
    """
    if not jobs_todo:
        return []
    queued = [(job, 1) for job in jobs_todo]  # (job, attempt)
    running = {}  # process -> (job, attempt, the pipe its steps arrive on)
    shown, results = {}, []  # shown: each running run's steps already on the bar
    bar = tqdm(total=len(jobs_todo) * steps, disable=not progress, unit="step",
               desc=f"{len(jobs_todo)} runs", dynamic_ncols=True)
    try:
        with _threads_per_run(n_jobs):
            while queued or running:
                while queued and len(running) < n_jobs:
                    job, attempt = queued.pop(0)
                    process, pipe = _start(job)
                    running[process] = (job, attempt, pipe)
                time.sleep(0.2)  # the bar is redrawn 5 times a second, not at every step
                for process, (job, attempt, pipe) in list(running.items()):
                    _show_steps(pipe, shown, bar)
                    if process.is_alive():
                        continue
                    del running[process]
                    pipe.close()
                    result = _outcome(job, attempt, process.exitcode, steps, shown, bar)
                    if result is None:
                        queued.append((job, attempt + 1))
                    else:
                        results.append(result)
                bar.set_postfix_str(", ".join(f"{k} step {s}" for k, s in shown.items()))
    except KeyboardInterrupt:
        _stop(running)
        raise
    finally:
        bar.close()
    return results


@contextlib.contextmanager
def _threads_per_run(n_jobs: int):
    """The cores split between parallel runs, through the environment the processes start with."""
    threads = str(max(1, (os.cpu_count() or 1) // n_jobs))
    env = {"MINQKV_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start(job: dict) -> tuple:
    """run_one(job) in a fresh process; -> (process, the pipe its steps arrive on).

    Each run reports on a pipe of its own: a run killed mid-report cannot block the others, and
    a run whose sweep died finds the pipe closed and stops.
    """
    Path(job["run_dir"], "result.json").unlink(missing_ok=True)  # a failed attempt's: this one writes its own
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    # daemon: should the sweep exit some other way, multiprocessing stops its runs
    process = context.Process(target=_train_in_child, args=(job, sender), daemon=True)
    process.start()
    sender.close()  # the child holds its own end
    return process, receiver


def _train_in_child(job: dict, sender) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's to handle: it stops this process
    signal.signal(signal.SIGTERM, _exit_on_signal)
    run_one(job, _PipeProgress(sender))


def _exit_on_signal(signum, frame):
    # exit like a return from Python, so the process releases what it holds (its locks,
    # multiprocessing's semaphores) instead of leaving the resource tracker a warning
    raise SystemExit(128 + signum)


class _PipeProgress:
    """run_one's progress queue in a local run: (key, step) up the run's own pipe."""

    def __init__(self, sender):
        self.sender = sender

    def put(self, item) -> None:
        try:
            self.sender.send(item)
        except BrokenPipeError:  # nobody reads: the sweep is gone
            raise SystemExit("the sweep that started this run is gone") from None


def _show_steps(pipe, shown: dict, bar) -> None:
    try:
        while pipe.poll():
            key, step = pipe.recv()
            bar.update(step - shown.get(key, 0))
            shown[key] = step
    except EOFError:  # the process has exited
        pass


def _outcome(job: dict, attempt: int, exitcode, steps: int, shown: dict, bar):
    """The result of a run whose process has exited; None: it saved none (killed), try again."""
    key = f"{job['variant']} seed {job['seed']}"
    done = shown.pop(key, 0)
    result = _saved_result(Path(job["run_dir"]))
    if result is None and attempt < ATTEMPTS:
        bar.write(f"{key}: its process was lost (exit code {exitcode}); trying again")
        bar.update(-done)
        return None
    if result is None:
        result = _record_lost(job, exitcode, attempt)
    bar.update(steps - done)
    if result["status"] != "ok":
        bar.write(f"{key}: FAILED: {result['error']}")
    return result


def _record_lost(job: dict, exitcode, attempts: int) -> dict:
    """The failed record of a run whose process died on every attempt before saving a result."""
    result = {"status": "failed", "attempts": attempts,
              "error": f"its training process was lost on each of {attempts} attempts "
                       f"(last exit code {exitcode})",
              "label": job["label"], "variant": job["variant"], "seed": job["seed"]}
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / "result.json", json_text(result, indent=2) + "\n")
    return result


def _stop(running: dict) -> None:
    """Stop the running processes now (a checkpoint is written atomically: the last one stays)."""
    for process in running:
        process.terminate()
    for process, (_, _, pipe) in running.items():
        process.join(timeout=10)
        if process.is_alive():  # deaf to SIGTERM (stuck in C code): no clean exit, but stopped
            process.kill()
            process.join()
        pipe.close()


# ---- tables --------------------------------------------------------------------------------


def aggregate(results: list, plan: dict) -> list:
    """One row per variant: means and standard deviations over seeds, change against canonical."""
    rows = []
    for run in plan["runs"]:
        mine = [r for r in results if r["variant"] == run["variant"]]
        ok = [r for r in mine if r["status"] == "ok"]
        row = {"variant": run["variant"], "label": run["label"], "seeds": len(ok),
               "failed": len(mine) - len(ok),
               "errors": sorted({r["error"] for r in mine if r["status"] != "ok"})}
        if ok:
            row.update(_summarise(ok))
            if "projections" in row:  # out of the 3 per layer of canonical attention
                row["projections"] += f"/{3 * plan['model']['n_layer']}"
        rows.append(row)
    canonical = next((r for r in rows if r["variant"] == "abc" and "val_loss" in r), None)
    for row in rows:
        if canonical is not None and "val_loss" in row:
            metric = "val_bpc" if "val_bpc" in row else "accuracy"
            row["delta_vs_canonical"] = row[metric] - canonical[metric]
            row["delta_pct"] = 100 * row["delta_vs_canonical"] / canonical[metric]
            mine = [r for r in results if r["variant"] == row["variant"] and r["status"] == "ok"]
            row["steps_to_target"] = steps_to_reach(mine, CONVERGED * canonical["val_loss"])
    return rows


def steps_to_reach(results: list, target: float):
    """Mean over seeds of the first evaluated step whose val loss <= target; None when a seed never does."""
    steps = []
    for result in results:
        reached = [step for step, loss in result.get("eval_curve", []) if loss <= target]
        if not reached:
            return None
        steps.append(reached[0])
    return float(np.mean(steps)) if steps else None


def _summarise(ok: list) -> dict:
    first = ok[0]
    summary = {key: first[key] for key in ("code", "attention_params", "params", "flops_per_token")}
    summary["code"] = " | ".join(dict.fromkeys(r["code"] for r in ok))  # gated seeds may prune differently
    if all("projections_kept" in r for r in ok):
        summary["projections_kept"] = float(np.mean([r["projections_kept"] for r in ok]))
        summary["projections"] = " | ".join(dict.fromkeys(str(r["projections_kept"]) for r in ok))
    for metric in ("val_loss", "unpruned_val_loss", "val_bpc", "accuracy", "tokens_per_s",
                   "decode_ms_per_token", "kv_cache_bytes_per_token", "peak_rss_mb"):
        values = [r[metric] for r in ok if _measured(r.get(metric))]
        if values:
            summary[metric] = float(np.mean(values))
            summary[metric + "_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return summary


def _measured(value) -> bool:
    """A figure, not a hole: result.json has null (older ones NaN) where a run could not measure one."""
    return isinstance(value, (int, float)) and math.isfinite(value)


COLUMNS = [  # (key, header, format)
    ("variant", "variant", "{}"), ("code", "code", "{}"), ("projections", "Q/K/V matrices", "{}"),
    ("attention_params", "attn params", "{:,}"),
    ("params", "params", "{:,}"), ("flops_per_token", "FLOPs/token", "{:,}"),
    ("val_loss", "val loss", "{:.4f}"), ("unpruned_val_loss", "val loss before pruning", "{:.4f}"),
    ("val_bpc", "val bpc", "{:.4f}"), ("accuracy", "accuracy", "{:.4f}"),
    ("delta_vs_canonical", "Δ vs abc", "{:+.4f}"), ("delta_pct", "Δ %", "{:+.2f}%"),
    ("steps_to_target", f"steps to canonical's final loss x {CONVERGED}", "{:,.0f}"),
    ("tokens_per_s", "train tokens/s", "{:,.0f}"), ("decode_ms_per_token", "decode ms/token", "{:.2f}"),
    ("kv_cache_bytes_per_token", "KV bytes/token", "{:,.0f}"), ("peak_rss_mb", "peak MB", "{:.0f}"),
]
WITH_SPREAD = {"val_loss", "unpruned_val_loss", "val_bpc", "accuracy"}


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "steps_to_target" and key in row and row[key] is None:
        return "-"  # never reached
    if key not in row:
        return "failed" if key == "val_loss" and row.get("failed") else ""
    text = fmt.format(row[key])
    if key in WITH_SPREAD and row.get("seeds", 0) > 1:
        text += " ± " + fmt.format(row[key + "_std"])
    return text.replace("|", "\\|")  # seeds that pruned differently are 'a | b': not a new column


def format_markdown(rows: list, plan: dict) -> str:
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    seeds = plan["seeds"]
    lines.append("")
    lines.append(f"preset `{plan['preset']}`, data `{plan['data']}`, {seeds} seed(s) per variant"
                 + (" (mean ± std)" if seeds > 1 else "") + f"; model {plan['model']}; "
                 f"{plan['train']['steps']} steps of batch {plan['train']['batch_size']}.")
    if any("steps_to_target" in r for r in rows):
        lines.append(f"Steps to canonical's final loss x {CONVERGED}: the first evaluation (every "
                     f"{plan['train']['eval_interval']} steps) whose validation loss is at most {CONVERGED} x the "
                     "canonical run's final one, mean over seeds; '-': never reached "
                     "(gated runs: before pruning).")
    if any("(L=" in r["variant"] for r in rows):
        lines.append("Gated runs (L = weight of the expected number of open gates) report the pruned model; "
                     "their code is the per-layer codes it kept (seeds separated by |).")
    for r in rows:
        for error in r.get("errors", []):
            lines.append(f"- {r['variant']} failed: {error}")
    lines += [f"Note: {note}." for note in plan["notes"]]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list, plan: dict) -> None:
    (out / "results.json").write_text(json_text({"sweep": plan, "rows": rows}, indent=2) + "\n")
    keys = [k for k, _, _ in COLUMNS] + [k + "_std" for k in sorted(WITH_SPREAD)] + ["seeds", "failed"]
    keys = [k for k in keys if any(k in r for r in rows)]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(format_markdown(rows, plan))


# ---- plots (optional: matplotlib) ---------------------------------------------------------


def write_plots(out, rows: list) -> list:
    """Validation curves, final metric with seed spread, parameters against the metric, and for a
    sweep of the gate penalty the metric against the Q/K/V matrices kept."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'minqkv[plot]' (the tables are written)") from None
    out = Path(out)
    done = [r for r in rows if "val_loss" in r]
    metric = "val_bpc" if any("val_bpc" in r for r in done) else "accuracy"
    paths = [out / "curves.png", out / "final.png", out / "tradeoff.png"]

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(done):
        color = f"C{i % 10}"
        for seed in range(row["seeds"]):  # seed 0 named in the legend, the others thinner
            steps, values = _curve(out, row["variant"], metric, seed)
            ax.plot(steps, values, color=color, linestyle=("-", "--", ":")[i // 10 % 3],
                    label=row["variant"] if seed == 0 else None, linewidth=1.5 if seed == 0 else 0.8)
    ax.set(xlabel="step", ylabel=metric, title="validation during training (every seed; gated: before pruning)")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(8, 5))
    names = [r["variant"] for r in done]
    ax.bar(names, [r[metric] for r in done], yerr=[r.get(metric + "_std", 0) for r in done], capsize=3)
    low = min(r[metric] for r in done)
    ax.set_ylim(low * 0.95 if metric == "val_bpc" else 0, None)
    ax.set(ylabel=metric, title=f"final {metric} (error bars: std over seeds)")
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.savefig(paths[1], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(7, 5))
    for row in done:
        ax.scatter(row["attention_params"], row[metric])
        ax.annotate(row["variant"], (row["attention_params"], row[metric]), fontsize=7)
    ax.set(xlabel="attention parameters", ylabel=metric, title="parameters against quality")
    fig.savefig(paths[2], dpi=120, bbox_inches="tight")
    swept = [r for r in done if "(L=" in r["variant"] and "projections_kept" in r]
    if swept:
        paths.append(_plot_pruning(plt, out / "pruning.png", done, swept, metric))
    plt.close("all")
    return paths


def _plot_pruning(plt, path: Path, done: list, swept: list, metric: str) -> Path:
    """Static variants as points, the gated sweep (pruned models) as a curve, against matrices kept."""
    fig, ax = plt.subplots(figsize=(7, 5))
    static = [r for r in done if r not in swept and "projections_kept" in r]
    for row in static:
        ax.scatter(row["projections_kept"], row[metric], color="tab:gray")
        ax.annotate(row["variant"], (row["projections_kept"], row[metric]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    swept = sorted(swept, key=lambda r: r["projections_kept"])
    ax.errorbar([r["projections_kept"] for r in swept], [r[metric] for r in swept],
                yerr=[r.get(metric + "_std", 0) for r in swept], marker="o", capsize=3, color="tab:blue",
                label="gated, pruned (one point per L)")
    for row in swept:
        ax.annotate(row["variant"].split("(")[1].rstrip(")"), (row["projections_kept"], row[metric]),
                    fontsize=8, xytext=(4, -10), textcoords="offset points", color="tab:blue")
    ax.set(xlabel="attention Q/K/V projection matrices kept", ylabel=metric,
           title="pruning by hard-concrete gates against static variants")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _curve(out: Path, variant: str, metric: str, seed: int = 0) -> tuple:
    path = _run_dir(out, variant, seed) / "metrics.jsonl"
    if not path.exists():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records], [r.get(metric, math.nan) for r in records]
