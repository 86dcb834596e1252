"""The processes of a local sweep: one sweep per folder, a killed run is tried again, Ctrl-C stops
everything at once, and a killed sweep leaves no process of its own behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minqkv.lab import ablate
from minqkv.lab.cli import main

# a sweep that trains far longer than any test waits: the tests stop it
LONG_SWEEP = """
import sys
from minqkv.lab import ablate
from minqkv.lab.cli import main
tiny = ablate.SWEEP_PRESETS["tiny"]
ablate.SWEEP_PRESETS["tiny-long"] = {**tiny, "train": {**tiny["train"], "steps": 1_000_000}}
sys.exit(main(["ablate", "--preset", "tiny-long", "--data", "synthetic:copy", "--out", sys.argv[1],
               "--variants", sys.argv[2], "--jobs", sys.argv[3], "--quiet", "--no-plots"]))
"""
# a sitecustomize.py: each new training process of a sweep kills itself until KILLS have died
KILLER = """
import os, signal, sys
from pathlib import Path
if "--multiprocessing-fork" in sys.orig_argv:
    tally = Path(os.environ["KILLED_TALLY"])
    if len(tally.read_text()) < int(os.environ["KILLS"]):
        tally.write_text(tally.read_text() + "x")
        os.kill(os.getpid(), signal.SIGKILL)
"""
WAIT_S = 60  # a bound for waits on other processes, never reached when things work


def start_long_sweep(out: Path, variants: str, jobs: int) -> subprocess.Popen:
    """The sweep in its own session, as a terminal runs a command (Ctrl-C reaches its whole group).

    SIGINT is set back to its default in the child: a shell that started the tests in the
    background made them ignore it, and an ignored signal stays ignored across exec.
    """
    return subprocess.Popen([sys.executable, "-c", LONG_SWEEP, str(out), variants, str(jobs)],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {WAIT_S} s for {what}")
        time.sleep(0.05)


def wait_for_checkpoints(out: Path, *runs: str) -> None:
    wait_for(lambda: all((out / "runs" / run / "ckpt.npz").exists() for run in runs), f"checkpoints of {runs}")


def descendants(pid: int) -> list:
    """Every process below pid, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not collected it


@pytest.fixture
def stop_leftovers():
    """Whatever a test started and left running is killed at its end, by pid."""
    started = []
    yield started
    for pid in started:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def kill_training_processes(monkeypatch, tmp_path, kills: int) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILLER)
    (tmp_path / "tally").write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                                                   os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KILLED_TALLY", str(tmp_path / "tally"))
    monkeypatch.setenv("KILLS", str(kills))


def test_a_run_whose_process_is_killed_is_tried_again(tmp_path, monkeypatch):
    kill_training_processes(monkeypatch, tmp_path, kills=1)
    [row] = ablate.run_sweep("tiny", "synthetic:copy", tmp_path / "out", "abc", progress=False)
    assert (row["seeds"], row["failed"]) == (1, 0)
    assert (tmp_path / "tally").read_text() == "x"


def test_a_run_killed_on_both_attempts_is_recorded_as_failed_twice(tmp_path, monkeypatch):
    kill_training_processes(monkeypatch, tmp_path, kills=2)
    out = tmp_path / "out"
    [row] = ablate.run_sweep("tiny", "synthetic:copy", out, "abc", progress=False)
    assert row["failed"] == 1 and "lost on each of 2 attempts" in row["errors"][0]
    result = json.loads((out / "runs" / "abc-seed0" / "result.json").read_text())
    assert (result["status"], result["attempts"]) == ("failed", 2)
    assert "abc failed: its training process was lost on each of 2 attempts" in (out / "results.md").read_text()


def test_a_running_sweep_refuses_a_second_one_on_its_folder(tmp_path, capsys, stop_leftovers):
    sweep = start_long_sweep(tmp_path, "abc", jobs=1)
    stop_leftovers.append(sweep.pid)
    wait_for_checkpoints(tmp_path, "abc-seed0")
    stop_leftovers += descendants(sweep.pid)
    code = main(["ablate", "--preset", "tiny", "--data", "synthetic:copy", "--out", str(tmp_path),
                 "--quiet", "--no-plots"])
    assert code == 2
    assert f"sweep folder {tmp_path} is in use by another minqkv process (pid {sweep.pid})" in capsys.readouterr().err
    os.killpg(sweep.pid, signal.SIGINT)
    sweep.communicate(timeout=WAIT_S)


def test_ctrl_c_starts_no_queued_run_and_stops_the_running_one_keeping_its_checkpoint(tmp_path, stop_leftovers):
    sweep = start_long_sweep(tmp_path, "abc,abb,aab", jobs=1)
    stop_leftovers.append(sweep.pid)
    wait_for_checkpoints(tmp_path, "abc-seed0")
    started = descendants(sweep.pid)
    stop_leftovers += started
    os.killpg(sweep.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    _, stderr = sweep.communicate(timeout=WAIT_S)
    assert sweep.returncode == 130
    assert stderr.strip().splitlines() == [
        f"minqkv ablate: interrupted; the finished runs are saved in {tmp_path / 'runs'} and the others "
        "keep their last checkpoint: run the same command again to resume"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["abc-seed0"]
    assert not (tmp_path / "runs" / "abc-seed0" / "result.json").exists()
    assert (tmp_path / "runs" / "abc-seed0" / "ckpt.npz").exists()
    wait_for(lambda: not any(alive(pid) for pid in started), "the sweep's processes to end")


def test_a_killed_sweep_leaves_no_process_of_its_own_running(tmp_path, stop_leftovers):
    sweep = start_long_sweep(tmp_path, "abc,abb", jobs=2)
    stop_leftovers.append(sweep.pid)
    wait_for_checkpoints(tmp_path, "abc-seed0", "abb-seed0")
    started = descendants(sweep.pid)
    stop_leftovers += started
    assert len(started) >= 2  # both runs (and any helper process of multiprocessing)
    sweep.kill()
    sweep.wait()
    wait_for(lambda: not any(alive(pid) for pid in started), "the sweep's processes to end")
