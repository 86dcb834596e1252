"""Crash safety: a training process killed at any moment (SIGKILL, even in the middle of writing a
checkpoint) leaves a loadable checkpoint, and resuming it gives exactly the uninterrupted run.

Every step is evaluated and saved, so a good share of the run is spent writing checkpoints and
the seeded random kills land inside writes as well as between them. A run stopped politely
(Ctrl-C, SIGTERM) or by the file system (the file-size limit) says so in one line and keeps its
checkpoint.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
import types
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


def start_training(text_file, out: Path, *extra, preexec_fn=None) -> subprocess.Popen:
    """`minqkv train` in a fresh process, resuming when a checkpoint is there (as a user would)."""
    resume = ["--resume"] if checkpoint_path(out).exists() else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc written: a file-size limit applies to those too
    return subprocess.Popen([sys.executable, "-m", "minqkv", "train", "--data", text_file, "--out", str(out),
                             *TRAIN, *extra, *resume], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=preexec_fn)


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


# ---- stopped by a signal or by the file system -------------------------------------------------------


def wait_for_the_first_checkpoint(process, out: Path) -> None:
    for _ in range(6000):  # a bounded wait (up to a minute), not a timing
        if checkpoint_path(out).exists() or process.poll() is not None:
            return
        time.sleep(0.01)


@pytest.mark.parametrize("signal_number, exit_code, said", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "stopped by SIGTERM"),
], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_run_says_how_to_resume_in_one_line(text_file, tmp_path, signal_number, exit_code, said):
    out = tmp_path / "run"

    def default_ctrl_c():  # a shell starts background jobs with SIGINT ignored, and children inherit that
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = start_training(text_file, out, "--steps", "5000", preexec_fn=default_ctrl_c)
    wait_for_the_first_checkpoint(process, out)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == exit_code, err
    assert err == (f"minqkv train: {said}; its last checkpoint in {out} is kept: continue it with "
                   f"`minqkv train --out {out} --resume`\n")
    load_checkpoint(out)


def test_a_checkpoint_over_the_file_size_limit_is_one_line_and_keeps_the_old_checkpoint(text_file, tmp_path):
    out = tmp_path / "run"
    finish(start_training(text_file, out, "--steps", "2"))
    size = checkpoint_path(out).stat().st_size

    def limit_file_size():  # ulimit -f: a write past it raises SIGXFSZ, which kills unless ignored
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    process = start_training(text_file, out, "--steps", "4", preexec_fn=limit_file_size)
    _, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == 2, err
    assert err.startswith(f"minqkv train: error: {checkpoint_path(out)}: File too large"), err
    assert len(err.strip().splitlines()) == 1
    assert load_checkpoint(out)[0]["step"] == 2
    assert not temporary_files(out)


def test_a_signal_that_lands_inside_a_finalizer_is_sent_again_not_dropped(monkeypatch):
    # Python drops an exception raised in __del__ (it prints "Exception ignored"), so a stop
    # signal that arrives while a finalizer runs must not raise there but come back afterwards.
    from minqkv.lab import cli

    resent = []
    monkeypatch.setattr(cli.threading, "Timer",
                        lambda delay, function, args: types.SimpleNamespace(start=lambda: resent.append(args)))

    class Finalized:
        def __del__(self):
            cli._raise_stop(signal.SIGTERM, sys._getframe())

    Finalized()  # collected at once: its __del__ runs here
    assert resent == [(os.getpid(), signal.SIGTERM)]
    with pytest.raises(cli.Terminated):
        cli._raise_stop(signal.SIGTERM, sys._getframe())
    with pytest.raises(KeyboardInterrupt):
        cli._raise_stop(signal.SIGINT, sys._getframe())


def test_a_signal_that_lands_during_a_write_is_held_until_the_file_is_whole(tmp_path):
    # CI saw Ctrl-C land inside np.savez: zipfile's cleanup raised "Can't close the ZIP file while
    # there is an open writing handle" over the KeyboardInterrupt and the run failed instead of
    # stopping. During a write the handler holds the signal; the write ends, then the stop comes.
    from minqkv import atomic
    from minqkv.lab import cli

    previous = signal.signal(signal.SIGTERM, cli._raise_stop)
    path = tmp_path / "file.txt"
    try:
        with pytest.raises(cli.Terminated):
            with atomic.whole_write():
                os.kill(os.getpid(), signal.SIGTERM)  # handled here, at once: held, not raised
                atomic.write_atomically(path, "whole")
                assert path.read_text() == "whole"
        assert not atomic.writing()
        assert not list(tmp_path.glob("*.tmp"))
        with pytest.raises(cli.Terminated):  # a write that fails still owes the stop it held
            with atomic.whole_write():
                os.kill(os.getpid(), signal.SIGTERM)
                raise OSError("disk full")
    finally:
        signal.signal(signal.SIGTERM, previous)
