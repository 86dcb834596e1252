"""The ablation bench: train many attention variants under identical settings and compare them.

A sweep is a preset (SWEEP_PRESETS: sizes, training settings, seeds and variants), the data and
an output folder. run_sweep() plans every (variant, seed) run, trains each in a fresh process
(so each run's peak memory is its own and runs can go in parallel; ablate_run.py is one run,
cluster.py sends the runs to a Dask cluster instead), and writes OUT/results.csv,
OUT/results.json and OUT/results.md (ablate_tables.py; plots: ablate_plots.py).

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
A preset may also list block sizes and learning rates: every variant then runs once per
(block size, learning rate), named 'abc(T=64,lr=0.003)', and the table keeps each variant's best
learning rate at each block size (ablate_tables.recall_rows).
A preset may ask for longer contexts at evaluation (extrapolation: multiples of the block size):
every model whose positions need no table then also reports its validation loss there (ablate_run).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..atomic import json_text, write_atomically
from ..attention import ALL_CODES
from ..lock import folder_lock
from ..model import GPTConfig
from .ablate_run import ATTEMPTS, run_folder, run_one, saved_result
from .ablate_tables import aggregate, write_results

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

# The mqar preset's budget: one run (abc, T = 64, batch 32, one thread) takes about 35 ms a step
# now that the 8192-way output head reads only the answer positions (GPT.loss; it took 130 ms when
# the head scored every position); 1500 steps, where abc reached an accuracy of 0.66 and was still
# rising (0.10 at step 400, 0.38 at 1000), so about an hour for the 114 runs with --jobs 2 on 2 cores
# (the README's MQAR section has the measured wall time). --steps N trains every run N steps instead.
MQAR_STEPS = 1500
# beside the 15 codes, the attention kinds whose decoding state is not a growing KV cache: a window's
# is capped at W tokens, linear attention's is a fixed matrix; ALiBi's is abc's (a bias, no table)
MQAR_KINDS = ["abc+window32", "abc+linear", "abc+performer64", "abc+alibi"]

# Attention kinds beside the projection codes: sliding windows, linear attention (elu + 1 and
# Performer features) and ALiBi, against canonical, the codes that share or drop projections, and no
# projections at all.
BASELINE_VARIANTS = ["abc", "abb", "-ab", "aaa+rotate", "---", "abc+window16", "abc+window32",
                     "abc+linear", "abc+performer64", "abc+alibi"]
# The baselines preset's budget: at nanoGPT's CPU shape one step (batch 12, T = 64, one thread, two
# runs at once on 2 cores) took 44-57 ms for the softmax kinds, 70 ms for abc+linear and 78 ms for
# abc+performer64, 57 ms on average; a whole run of 2000 steps (nanoGPT's ~2000 iterations) with its
# evaluations 2.3 times its steps' ms in seconds (abc: 130 s, abc+linear: 157 s). So the 20 runs take
# about 23 minutes with --jobs 2 on 2 cores, and about 5 minutes with --jobs 16 on 16 cores.
BASELINE_STEPS = 2000

SWEEP_PRESETS = {
    # the README's demonstration (its measured time is stated there, once)
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
    # multi-query associative recall on Zoology's protocol (synthetic:mqar: vocabulary 8192, T // 16
    # pairs, power-law query gaps) at block sizes 64, 128 and 256, the 15 codes and MQAR_KINDS, 2 layers
    # of width 64 and one head as Zoology's attention baseline; each (code, T) at two learning rates
    # (half a decade apart; 1e-2 trained abc worse than 3e-3), the best reported against the KV bytes
    # a token costs a layer: the field's recall-vs-memory picture. 2048 tokens a step at every T
    # (batch 32, 16, 8: 128 answers a step), so every run costs the same. See MQAR_STEPS for the budget.
    "mqar": dict(model=dict(n_layer=2, n_head=1, n_embd=64, block_size=64),
                 train=dict(steps=MQAR_STEPS, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                            eval_interval=100, eval_iters=8),
                 seeds=1, data="synthetic:mqar", variants=",".join([*ALL_CODES, *MQAR_KINDS]),
                 block_sizes=[64, 128, 256], learning_rates=[1e-3, 3e-3], tokens_per_batch=2048),
    # attention kinds against projection codes at nanoGPT's CPU shape (n_layer 4, n_head 4, T 64,
    # n_embd 128, batch 12) on Shakespeare, 2 seeds; models without a position table (abc+alibi)
    # are also scored at 2 and 4 times the block size they were trained on. See BASELINE_STEPS.
    "baselines": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
                      train=dict(steps=BASELINE_STEPS, batch_size=12, lr=1e-3, min_lr=1e-4,
                                 warmup_steps=100, eval_interval=100, eval_iters=20),
                      seeds=2, variants=",".join(BASELINE_VARIANTS), extrapolation=[2, 4]),
    # seconds: for tests of the bench itself
    "tiny": dict(model=dict(n_layer=1, n_head=2, n_embd=16, block_size=16),
                 train=dict(steps=10, batch_size=4, eval_interval=5, eval_iters=2), seeds=1),
}


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


def plan_sweep(preset: str, data: str | None, variants=None, seeds: int | None = None,
               steps: int | None = None) -> dict:
    """Every run of a sweep; variants=None takes the preset's own list (else the study's),
    data=None the preset's own data (else Shakespeare), steps=None the preset's training steps.

    Each label is normalised to its variant at the preset's sizes; a label that names a variant
    already listed runs once (the first label is kept), and plan["notes"] says so.
    """
    if preset not in SWEEP_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(SWEEP_PRESETS)}")
    spec = SWEEP_PRESETS[preset]
    data = data or spec.get("data", "shakespeare")
    seeds = spec["seeds"] if seeds is None else seeds
    if seeds <= 0:
        raise ValueError(f"--seeds must be a positive integer, got {seeds}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"--steps must be a positive integer, got {steps!r}")
    train = spec["train"] if steps is None else {**spec["train"], "steps": steps}
    runs, notes, first_label = [], [], {}
    for label in selected_labels(spec.get("variants") if variants is None else variants):
        run = _planned_run(label, spec["model"], preset)
        if run["variant"] in first_label:
            notes.append(_same_variant_note(label, first_label[run["variant"]], run, spec["model"]))
            continue
        first_label[run["variant"]] = label
        runs += _grid_runs(run, spec)
    plan = {"preset": preset, "data": data, "seeds": seeds, "runs": runs,
            "model": spec["model"], "train": train, "notes": notes}
    if spec.get("block_sizes") or spec.get("learning_rates"):  # the tables add the best learning rate per block size
        plan["grid"] = {key: spec[key] for key in ("block_sizes", "learning_rates", "tokens_per_batch")
                        if spec.get(key)}
    if spec.get("extrapolation"):  # the runs score longer contexts; the tables add those columns
        plan["extrapolation"] = list(spec["extrapolation"])
    return plan


def _planned_run(label: str, model: dict, preset: str) -> dict:
    """{label, variant, overrides}; the variant is the label as the model at these sizes names itself."""
    overrides = GPTConfig.overrides_from_label(label)
    if overrides.get("n_kv_head") and model["n_head"] % overrides["n_kv_head"]:
        raise ValueError(f"{label!r}: n_kv_head={overrides['n_kv_head']} does not divide "
                         f"n_head={model['n_head']} of preset {preset!r}")
    config = GPTConfig(**{**model, **overrides})  # raises on impossible variants
    return {"label": label, "variant": config.variant_label(), "overrides": overrides}


def _grid_runs(run: dict, spec: dict) -> list:
    """The run once per point of the preset's grid: gate penalty (gated variants only), block size,
    learning rate; its name gains the point, 'abc+gate(L=0.01)', 'abc(T=64,lr=0.003)'."""
    axes = []  # (name in the label, values, the job's key it goes under, the config field it sets)
    if run["overrides"].get("gate") and spec.get("gate_penalties"):
        axes.append(("L", spec["gate_penalties"], "train_overrides", "gate_penalty"))
    if spec.get("block_sizes"):
        axes.append(("T", spec["block_sizes"], "overrides", "block_size"))
    if spec.get("learning_rates"):
        axes.append(("lr", spec["learning_rates"], "train_overrides", "lr"))
    if not axes:
        return [run]
    runs = []
    for point in itertools.product(*(values for _, values, _, _ in axes)):
        planned = {**run, "overrides": dict(run["overrides"])}
        for (_, _, key, field), value in zip(axes, point):
            planned.setdefault(key, {})[field] = value
        if "lr" in planned.get("train_overrides", {}):  # the schedule ends at a tenth of its peak, as in every preset
            planned["train_overrides"]["min_lr"] = planned["train_overrides"]["lr"] / 10
        if spec.get("tokens_per_batch") and "block_size" in planned["overrides"]:
            # every block size sees as many tokens a step (and, at T // 16 pairs, as many answers), at one cost
            block_size = planned["overrides"]["block_size"]
            planned.setdefault("train_overrides", {})["batch_size"] = spec["tokens_per_batch"] // block_size
        planned["variant"] = f"{run['variant']}({','.join(f'{name}={v:g}' for (name, *_), v in zip(axes, point))})"
        runs.append(planned)
    return runs


def _same_variant_note(label: str, first: str, run: dict, model: dict) -> str:
    if label == first:
        return f"{label!r} is listed more than once: it runs once"
    at = f" at n_head={model['n_head']}" if "n_kv_head" in run["overrides"] else ""
    return f"{label!r} is the same variant as {first!r} ({run['variant']}){at}: it runs once"


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


# ---- the sweep ----------------------------------------------------------------------------


def run_sweep(preset: str, data: str | None, out, variants=None, seeds: int | None = None,
              jobs: int = 1, progress: bool = True, dask=None, steps: int | None = None) -> list:
    """Run (or finish) a sweep and write its tables; returns the aggregated rows.

    Raises FolderBusy while another sweep writes `out`, SweepInterrupted on Ctrl-C.
    """
    if jobs <= 0:
        raise ValueError(f"--jobs must be a positive integer, got {jobs}")
    plan = plan_sweep(preset, data, variants, seeds, steps)
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
            run_dir = run_folder(out, run["variant"], seed)
            result = saved_result(run_dir)
            if result is not None and result["status"] == "ok":
                done.append(result)
            else:
                todo.append({**run, "seed": seed, "run_dir": str(run_dir), "data": plan["data"],
                             "model": plan["model"], "train": plan["train"],
                             "extrapolation": plan.get("extrapolation", [])})
    return done, todo


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
                    _show_piped_steps(pipe, shown, bar)
                    if process.is_alive():
                        continue
                    del running[process]
                    pipe.close()
                    result = _result_of_exited(job, attempt, process.exitcode, steps, shown, bar)
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


def _show_piped_steps(pipe, shown: dict, bar) -> None:
    """Move the bar by the steps a run has sent up its pipe since the last look."""
    try:
        while pipe.poll():
            key, step = pipe.recv()
            bar.update(step - shown.get(key, 0))
            shown[key] = step
    except EOFError:  # the process has exited
        pass


def _result_of_exited(job: dict, attempt: int, exitcode, steps: int, shown: dict, bar):
    """The result of a run whose process has exited; None: it saved none (killed), try again."""
    key = f"{job['variant']} seed {job['seed']}"
    done = shown.pop(key, 0)
    result = saved_result(Path(job["run_dir"]))
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
