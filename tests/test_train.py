"""Specification of the trainer: learning, exact resume, atomic checkpoints, divergence, the final
summary, pruning of gated runs and configuration checks. Every run is tiny and takes well under
a second."""

import json
import math
import os
import re
from dataclasses import fields

import numpy as np
import pytest

import minqkv.atomic as atomic_module
import minqkv.checkpoint as checkpoint_module
import minqkv.train as train_module
from minqkv.checkpoint import load_checkpoint, load_model
from minqkv.data import TASK_TOKENIZER
from minqkv.lock import FolderBusy, folder_lock
from minqkv.model import GPTConfig
from minqkv.nn import Parameter
from minqkv.optim import AdamW
from minqkv.train import TrainConfig, TrainingDiverged, train

MODEL = dict(n_layer=1, n_head=2, n_embd=16, block_size=8)
RUN = dict(steps=12, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=4, eval_iters=2)
SUMMARY_KEYS = {"variant", "code", "params", "steps", "train_loss", "val_loss", "ms_per_step",
                "tokens_per_s", "peak_rss_mb", "wall_s"}


class Interrupt(KeyboardInterrupt):
    """Ctrl-C in the middle of a run (a subclass, so pytest.raises catches only this one)."""


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the cat sat on the mat. the dog ate the log. " * 80)
    return str(path)


def run(text_file, out, model=None, resume=False, on_step=None, **overrides):
    model_config = GPTConfig(**{**MODEL, **(model or {})})
    train_config = TrainConfig(data=text_file, out=str(out), **{**RUN, **overrides})
    return train(model_config, train_config, resume=resume, progress=False, on_step=on_step)


def stop_at(step):
    def on_step(done, loss):
        if done == step:
            raise Interrupt
    return on_step


def metric_lines(out, drop=("tokens_per_s",)):
    """metrics.jsonl records without their timing fields (which differ between any two runs)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def saved_arrays(out):
    meta, model_state, optim_state = load_checkpoint(out)
    arrays = {f"model/{k}": v for k, v in model_state.items()}
    arrays.update({f"optim/{k}/{key}": s[key] for k, s in optim_state["params"].items() for key in "mv"})
    return meta, arrays


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


# ---- learning ----------------------------------------------------------------------------------


def test_a_tiny_run_lowers_the_loss(text_file, tmp_path):
    losses = []
    final = run(text_file, tmp_path / "run", steps=30, eval_interval=10,
                on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    vocab = len(set(open(text_file).read()))
    assert final["val_loss"] < math.log(vocab) - 0.5


def test_a_short_run_learns_the_copy_task_far_above_chance(tmp_path):
    model = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    run_config = TrainConfig(data="synthetic:copy", out=str(tmp_path / "run"), steps=250, batch_size=16,
                             lr=1e-2, min_lr=1e-3, warmup_steps=10, eval_interval=250, eval_iters=4)
    final = train(model, run_config, progress=False)
    chance = 1 / TASK_TOKENIZER.vocab_size  # guessing any character of the vocabulary
    assert final["accuracy"] > 20 * chance
    assert SUMMARY_KEYS | {"accuracy"} <= final.keys() and "val_bpc" not in final


# ---- the files a run writes ----------------------------------------------------------------------


def test_final_json_holds_the_summary_of_a_text_run(text_file, tmp_path):
    final = run(text_file, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "final.json").read_text())
    assert on_disk == final
    assert SUMMARY_KEYS | {"val_bpc"} <= final.keys()
    assert final["variant"] == "abc" and final["code"] == "abc" and final["steps"] == 12
    assert final["val_bpc"] == pytest.approx(final["val_loss"] / math.log(2))


def test_final_json_params_count_the_model(text_file, tmp_path):
    final = run(text_file, tmp_path / "run", model=dict(code="shared-kv"))
    model, _, _ = load_model(tmp_path / "run")
    assert final["params"] == model.num_parameters()
    assert final["code"] == "abb"


def test_metrics_get_one_line_per_evaluation(text_file, tmp_path):
    run(text_file, tmp_path / "run")
    records = metric_lines(tmp_path / "run", drop=())
    assert [r["step"] for r in records] == [4, 8, 12]
    assert {"lr", "train_loss", "val_loss", "val_bpc", "tokens_per_s"} <= records[0].keys()


def test_checkpoint_is_written_without_leftover_temporary_files(text_file, tmp_path):
    run(text_file, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == [".lock", "ckpt.npz", "final.json", "metrics.jsonl"]  # .lock: see lock.py
    meta, _, _ = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 12


def test_a_failed_save_keeps_the_previous_checkpoint(text_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(text_file, out, steps=4)
    _, before = saved_arrays(out)

    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_module.os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        run(text_file, out, resume=True, steps=8)
    monkeypatch.undo()

    meta, after = saved_arrays(out)
    assert meta["step"] == 4
    assert_bitwise_equal(before, after)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_save_that_fails_before_writing_leaves_no_file(text_file, tmp_path, monkeypatch):
    def broken_savez(*args, **kwargs):
        raise OSError("cannot serialise")

    monkeypatch.setattr(checkpoint_module.np, "savez", broken_savez)
    with pytest.raises(OSError, match="cannot serialise"):
        run(text_file, tmp_path / "run")
    monkeypatch.undo()
    assert not any(p.name.startswith("ckpt.npz") for p in (tmp_path / "run").iterdir())


def test_a_fresh_run_into_a_folder_with_a_checkpoint_raises(text_file, tmp_path):
    run(text_file, tmp_path / "run", steps=4)
    with pytest.raises(FileExistsError, match="resume"):
        run(text_file, tmp_path / "run", steps=4)


def test_a_run_refused_by_a_later_check_leaves_no_output_folder(text_file, tmp_path):
    with pytest.raises(ValueError, match="too large for the 'val' split"):
        run(text_file, tmp_path / "run", model=dict(block_size=400))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("below", ["", "run"], ids=["the-file", "a-folder-below-it"])
def test_an_out_that_names_a_file_is_refused_and_the_file_left_alone(text_file, tmp_path, below):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ValueError, match="notes.txt is a file, not a folder"):
        run(text_file, notes / below)
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_an_out_ending_in_npz_is_refused_as_a_checkpoint_files_name(text_file, tmp_path, resume):
    if resume:
        run(text_file, tmp_path / "run", steps=4)
    out = tmp_path / "run" / "ckpt.npz" if resume else tmp_path / "run.npz"
    with pytest.raises(ValueError, match="ends in .npz, like a checkpoint file"):
        run(text_file, out, resume=resume, steps=8)


def test_resume_without_a_checkpoint_raises(text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(text_file, tmp_path / "empty", resume=True)


# ---- one writer per run folder -------------------------------------------------------------------


def test_a_run_into_the_folder_of_a_live_run_is_refused_naming_its_pid(text_file, tmp_path):
    out = tmp_path / "run"
    with folder_lock(out, "run folder"):  # stands for a live run (the lock is per open file, so this works in-process)
        with pytest.raises(FolderBusy, match=f"run folder {re.escape(str(out))} is in use .*pid {os.getpid()}"):
            run(text_file, out)
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_a_resume_beside_a_live_run_leaves_its_files_alone(text_file, tmp_path):
    out = tmp_path / "run"
    run(text_file, out, steps=4)
    being_written = out / "ckpt.npz.a1b2c3.tmp"  # the live run's next checkpoint, half written
    being_written.write_bytes(b"half")
    metrics = (out / "metrics.jsonl").read_text()
    with folder_lock(out, "run folder"):
        with pytest.raises(FolderBusy):
            run(text_file, out, resume=True, steps=8)
    assert being_written.exists()
    assert (out / "metrics.jsonl").read_text() == metrics


# ---- exact resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("interrupt_at", [8, 6], ids=["at-a-checkpoint", "between-checkpoints"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(text_file, tmp_path, interrupt_at):
    model = dict(dropout=0.1)  # dropout draws random numbers: their generator must resume too
    whole = run(text_file, tmp_path / "whole", model=model)

    with pytest.raises(Interrupt):
        run(text_file, tmp_path / "split", model=model, on_step=stop_at(interrupt_at))
    resumed = run(text_file, tmp_path / "split", model=model, resume=True)

    meta_whole, arrays_whole = saved_arrays(tmp_path / "whole")
    meta_split, arrays_split = saved_arrays(tmp_path / "split")
    assert_bitwise_equal(arrays_whole, arrays_split)
    assert meta_whole["batch_rng"] == meta_split["batch_rng"]
    assert meta_whole["dropout_rng"] == meta_split["dropout_rng"]
    assert metric_lines(tmp_path / "whole") == metric_lines(tmp_path / "split")
    for key in ("train_loss", "val_loss", "val_bpc", "params", "steps"):
        assert resumed[key] == whole[key], key


def test_a_resumed_gated_run_draws_the_same_gate_noise_as_the_uninterrupted_one(text_file, tmp_path):
    model = dict(gate=True)
    whole = run(text_file, tmp_path / "whole", model=model, gate_penalty=0.05)
    with pytest.raises(Interrupt):
        run(text_file, tmp_path / "split", model=model, gate_penalty=0.05, on_step=stop_at(6))
    resumed = run(text_file, tmp_path / "split", model=model, gate_penalty=0.05, resume=True)
    meta_whole, arrays_whole = saved_arrays(tmp_path / "whole")
    meta_split, arrays_split = saved_arrays(tmp_path / "split")
    assert_bitwise_equal(arrays_whole, arrays_split)
    assert meta_whole["gate_rng"] == meta_split["gate_rng"]
    assert resumed["gates"] == whole["gates"] and resumed["train_loss"] == whole["train_loss"]


def test_resume_with_other_settings_lists_every_difference(text_file, tmp_path):
    run(text_file, tmp_path / "run", steps=4)
    with pytest.raises(ValueError, match="only steps may change") as info:
        run(text_file, tmp_path / "run", resume=True, model=dict(code="abb", n_layer=2), lr=0.5)
    for difference in ("code 'abb' (saved run: 'abc')", "n_layer 2 (saved run: 1)",
                       "lr 0.5 (saved run: 0.01)"):
        assert difference in str(info.value)


def test_resume_accepts_a_variant_name_that_means_the_saved_code(text_file, tmp_path):
    run(text_file, tmp_path / "run", steps=4, model=dict(code="abb"))
    final = run(text_file, tmp_path / "run", steps=8, resume=True, model=dict(code="shared-kv"))
    assert final["code"] == "abb" and final["steps"] == 8


def test_resume_on_a_text_rewritten_with_other_characters_is_refused(text_file, tmp_path):
    run(text_file, tmp_path / "run", steps=4)
    with open(text_file) as f:
        text = f.read()
    with open(text_file, "w") as f:
        f.write(text.replace("g", "z"))  # same number of characters, so the same vocabulary size
    with pytest.raises(ValueError, match="another vocabulary .*only in the data: 'z', only in the checkpoint: 'g'"):
        run(text_file, tmp_path / "run", steps=8, resume=True)


def test_resume_drops_a_metrics_line_cut_short_by_a_crash(text_file, tmp_path):
    out = tmp_path / "run"
    run(text_file, out, steps=8)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "train_lo')  # a crash in the middle of writing a line
    run(text_file, out, steps=12, resume=True)
    assert [r["step"] for r in metric_lines(out)] == [4, 8, 12]


def test_resuming_a_finished_run_reports_its_last_train_loss(text_file, tmp_path):
    """A crash between the last checkpoint and final.json leaves nothing to train on resume."""
    first = run(text_file, tmp_path / "run", steps=8)
    again = run(text_file, tmp_path / "run", steps=8, resume=True)
    assert again["train_loss"] == first["train_loss"] and again["val_loss"] == first["val_loss"]


def test_resuming_a_finished_run_keeps_its_speed_figures(text_file, tmp_path):
    first = run(text_file, tmp_path / "run", steps=8)
    again = run(text_file, tmp_path / "run", steps=8, resume=True)
    assert (again["ms_per_step"], again["tokens_per_s"]) == (first["ms_per_step"], first["tokens_per_s"])
    assert math.isfinite(again["tokens_per_s"])


def test_a_finished_run_resumed_without_its_final_json_reports_no_speed_and_strict_json(text_file, tmp_path):
    out = tmp_path / "run"
    run(text_file, out, steps=8)
    (out / "final.json").unlink()  # a crash between the last checkpoint and final.json
    again = run(text_file, out, steps=8, resume=True)
    assert again["ms_per_step"] is None and again["tokens_per_s"] is None

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads((out / "final.json").read_text(), parse_constant=refuse) == again


def test_a_garbage_metrics_line_stops_the_resume_naming_the_file_and_line(text_file, tmp_path):
    out = tmp_path / "run"
    run(text_file, out, steps=8)
    first, second = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(f"{first}\nnot json\n{second}\n")
    where = re.escape(f"{out / 'metrics.jsonl'}:2")
    with pytest.raises(ValueError, match=f"{where} is not a metrics record .*delete or repair that line"):
        run(text_file, out, steps=12, resume=True)


def test_resume_cannot_shorten_a_run_below_its_finished_steps(text_file, tmp_path):
    run(text_file, tmp_path / "run", steps=8)
    with pytest.raises(ValueError, match="fewer than the 8 steps"):
        run(text_file, tmp_path / "run", resume=True, steps=4)


# ---- divergence --------------------------------------------------------------------------------


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    models = []
    real_build = train_module.build

    def build_and_keep_the_model(*args):
        model, opt = real_build(*args)
        models.append(model)
        return model, opt

    monkeypatch.setattr(train_module, "build", build_and_keep_the_model)

    def poison(done, loss):
        if done == 4:  # right after the step-4 checkpoint
            models[0].token_embedding.weight.data[...] = np.nan

    with pytest.raises(TrainingDiverged, match="loss became nan at step 4"):
        run(text_file, tmp_path / "run", on_step=poison)
    model, _, meta = load_model(tmp_path / "run")
    assert meta["step"] == 4
    assert all(np.isfinite(p.data).all() for p in model.parameters())


def test_non_finite_gradients_never_reach_a_checkpoint(text_file, tmp_path, monkeypatch):
    calls = []
    real_clip = train_module.clip_grad_norm

    def clip_with_nan_gradient(params, max_norm):
        calls.append(1)
        if len(calls) == 8:  # the step that ends at the step-8 checkpoint (step 4's is good)
            params[0].grad[...] = np.nan
        return real_clip(params, max_norm)

    monkeypatch.setattr(train_module, "clip_grad_norm", clip_with_nan_gradient)
    with pytest.raises(TrainingDiverged):
        run(text_file, tmp_path / "run")
    model, _, _ = load_model(tmp_path / "run")
    assert all(np.isfinite(p.data).all() for p in model.parameters())


# ---- gated runs are pruned ---------------------------------------------------------------------


def test_a_gated_run_writes_a_pruned_checkpoint_and_reports_both_losses(text_file, tmp_path):
    final = run(text_file, tmp_path / "run", model=dict(code="abc", gate=True), gate_penalty=0.01)
    assert set(final["gates"]) == {"0.q", "0.k", "0.v"}
    assert final["projections_total"] == 3
    assert final["projections_kept"] == 3 - sum(g == 0.0 for g in final["gates"].values())
    assert final["val_loss_before_pruning"] == final["val_loss"]
    assert np.isfinite(final["val_loss_after_pruning"]) and np.isfinite(final["val_bpc_after_pruning"])
    pruned, _, _ = load_model(tmp_path / "run" / "pruned")
    assert not pruned.config.gate
    assert pruned.config.layer_codes == final["pruned_codes"]
    assert pruned.num_parameters() == final["pruned_params"]
    assert "gates" in metric_lines(tmp_path / "run")[-1]


def test_a_strong_penalty_shuts_gates_exactly_and_pruning_keeps_the_loss(text_file, tmp_path):
    final = run(text_file, tmp_path / "run", model=dict(code="abc", gate=True, dtype="float64"),
                steps=40, gate_penalty=1.0, gate_lr=0.5)
    assert 0.0 in final["gates"].values()
    assert final["val_loss_after_pruning"] == pytest.approx(final["val_loss_before_pruning"], rel=1e-12)


def test_gates_learn_at_their_own_rate_and_other_parameters_at_lr(text_file, tmp_path):
    corpus = train_module.load_corpus(text_file)
    model, opt = train_module.build(GPTConfig(**MODEL, gate=True), TrainConfig(lr=1e-3, gate_lr=0.05), corpus)
    assert opt.lr_scale == {f"blocks.0.attn.gate_{r}": pytest.approx(50.0) for r in "qkv"}
    assert not any(opt.decays(name, p) for name, p in model.named_parameters() if ".gate_" in name)


def test_pruning_a_gated_run_with_every_gate_kept_does_not_change_its_loss(text_file, tmp_path):
    final = run(text_file, tmp_path / "run", model=dict(code="aab", gate=True, dtype="float64"),
                prune_threshold=0.0)
    assert final["pruned_codes"] in (["aab"], ["abc"])
    assert final["val_loss_after_pruning"] == pytest.approx(final["val_loss_before_pruning"], abs=1e-10)


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(eval_interval=0), "eval_interval must be a positive integer"),
    (dict(eval_iters=-1), "eval_iters must be a positive integer"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(lr=1e-3, min_lr=1e-2), "min_lr <= lr"),
    (dict(min_lr=-1e-3), "min_lr <= lr"),
    (dict(grad_clip=0.0), "grad_clip must be positive"),
    (dict(gate_penalty=-0.1), "gate_penalty must be >= 0"),
    (dict(lr=0.0, min_lr=0.0), "lr must be positive"),
    (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
    (dict(beta2=-0.5), r"beta2 must be in \[0, 1\)"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(prune_threshold=1.5), r"prune_threshold must be in \[0, 1\]"),
    (dict(gate_lr=0.0), "gate_lr must be positive"),
    (dict(seed=-1), "seed must be >= 0"),
])
def test_invalid_train_config_raises_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


@pytest.mark.parametrize("train_setting, optimizer_setting", [
    (dict(beta1=1.0), dict(betas=(1.0, 0.99))), (dict(beta2=-0.5), dict(betas=(0.9, -0.5))),
    (dict(weight_decay=-0.1), dict(weight_decay=-0.1)), (dict(lr=math.inf), dict(lr=math.inf))])
def test_the_optimizers_numbers_are_refused_by_one_check_with_one_message(train_setting, optimizer_setting):
    with pytest.raises(ValueError) as from_config:
        TrainConfig(**train_setting)
    with pytest.raises(ValueError) as from_optimizer:
        AdamW([("w", Parameter(np.zeros((2, 2))))], **optimizer_setting)
    assert str(from_config.value) == str(from_optimizer.value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("name", [f.name for f in fields(TrainConfig) if f.type == "float"])
def test_every_float_setting_must_be_finite(name, value):
    """inf passes a check such as 'gate_lr > 0' and nan fails none, so both are refused first."""
    with pytest.raises(ValueError, match=f"{name} must be a finite number, got {value}"):
        TrainConfig(**{name: value})
