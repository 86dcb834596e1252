"""Crash safety: a training process killed at any moment (SIGKILL, even in the middle of writing a
checkpoint) leaves a loadable checkpoint, and resuming it gives exactly the uninterrupted run.

Every step is evaluated and saved, so a good share of the run is spent writing checkpoints and
the seeded random kills land inside writes as well as between them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minqkv.checkpoint import checkpoint_path, load_checkpoint

REPO = Path(__file__).resolve().parent.parent
STEPS = 40
KILLS = 8
TRAIN = ["--steps", str(STEPS), "--eval-interval", "1", "--eval-iters", "1", "--n-layer", "1",
         "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4", "--dropout", "0.1",
         "--sample-tokens", "0", "--quiet"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the cat sat on the mat. the dog ate the log. " * 80)
    return str(path)


def start_training(text_file, out: Path) -> subprocess.Popen:
    """`minqkv train` in a fresh process, resuming when a checkpoint is there (as a user would)."""
    resume = ["--resume"] if checkpoint_path(out).exists() else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "minqkv", "train", "--data", text_file, "--out", str(out),
                             *TRAIN, *resume], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def temporary_files(out: Path) -> set:
    return set(out.glob("*.tmp")) if out.exists() else set()


def wait_for_a_new_checkpoint(process, out: Path) -> None:
    """Return once this process has saved a checkpoint (its training loop is running) or has ended."""
    def saved_at():
        path = checkpoint_path(out)
        return path.stat().st_mtime_ns if path.exists() else None

    before = saved_at()
    while process.poll() is None and saved_at() == before:
        time.sleep(0.002)


def wait_for_a_write_to_begin(process, out: Path) -> None:
    """Return as soon as a new temporary file shows that a checkpoint is being written."""
    before = temporary_files(out)
    while process.poll() is None and not temporary_files(out) - before:
        time.sleep(0.0002)


def finish(process) -> None:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()


def records(out: Path) -> list:
    """metrics.jsonl without its timing field, which differs between any two runs."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def test_killed_runs_leave_a_loadable_checkpoint_and_resume_to_the_same_losses(text_file, tmp_path):
    whole = tmp_path / "whole"
    finish(start_training(text_file, whole))

    killed = tmp_path / "killed"
    rng = np.random.default_rng(0)
    cut_writes = set()  # temporary files left by kills inside a write
    for kill in range(KILLS):
        process = start_training(text_file, killed)
        wait_for_a_new_checkpoint(process, killed)
        if kill % 2:
            wait_for_a_write_to_begin(process, killed)  # aim inside a write
        else:
            time.sleep(rng.uniform(0, 0.05))  # anywhere in a step
        process.send_signal(signal.SIGKILL)
        process.wait()
        cut_writes |= temporary_files(killed)
        if checkpoint_path(killed).exists():
            load_checkpoint(killed)  # raises CheckpointError if a kill left a broken file
    finish(start_training(text_file, killed))

    assert cut_writes, "no kill landed inside a checkpoint write"
    assert not temporary_files(killed), "the resumed run left the cut writes' temporary files"
    assert records(killed) == records(whole)
    meta_whole, arrays_whole, optim_whole = load_checkpoint(whole)
    meta_killed, arrays_killed, optim_killed = load_checkpoint(killed)
    assert meta_killed["step"] == STEPS and meta_killed["batch_rng"] == meta_whole["batch_rng"]
    for name in arrays_whole:
        assert np.array_equal(arrays_whole[name], arrays_killed[name]), name
    final_whole = json.loads((whole / "final.json").read_text())
    final_killed = json.loads((killed / "final.json").read_text())
    for key in ("train_loss", "val_loss", "val_bpc"):
        assert final_killed[key] == final_whole[key], key
