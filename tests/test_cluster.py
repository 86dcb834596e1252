"""Sweeps on a Dask cluster give the numbers and tables of a local sweep, survive a lost worker,
and refuse workers that run another minqkv."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minqkv.lab import ablate, cluster
from minqkv.lab.cli import main
from minqkv.lock import FolderBusy, folder_lock

if os.environ.get("CI"):
    import distributed  # CI must run these tests: a missing extra fails here instead of skipping
else:
    distributed = pytest.importorskip("distributed", reason="the Dask tests need pip install 'minqkv[dask]'")

VARIANTS, SEEDS, DATA = "abc,abb", 2, "synthetic:copy"
# measurements of this machine at this moment, not results of training
TIMINGS = {"ms_per_step", "tokens_per_s", "wall_s", "peak_rss_mb", "decode_ms_per_token"}
TIMED_HEADERS = {"train tokens/s", "decode ms/token", "peak MB"}


def sweep(out, **kwargs):
    return ablate.run_sweep("tiny", DATA, out, VARIANTS, seeds=SEEDS, progress=False, **kwargs)


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.removesuffix("_std") not in TIMINGS}


def run_results(out: Path) -> dict:
    return {path.parent.name: untimed(json.loads(path.read_text()))
            for path in sorted((out / "runs").glob("*/result.json"))}


def untimed_markdown(out: Path) -> list:
    """results.md as rows of cells, without the columns that measure speed and memory."""
    lines = (out / "results.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    keep = [i for i, name in enumerate(header) if name not in TIMED_HEADERS]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return [[row[i] for i in keep] for row in rows] + [line for line in lines if not line.startswith("|")]


def assert_same_sweep(local: Path, on_dask: Path) -> None:
    assert run_results(on_dask) == run_results(local)
    assert len(run_results(local)) == 4
    assert untimed_markdown(on_dask) == untimed_markdown(local)
    rows = [json.loads((out / "results.json").read_text())["rows"] for out in (local, on_dask)]
    assert [untimed(r) for r in rows[1]] == [untimed(r) for r in rows[0]]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    sweep(out, jobs=1)
    return out


class DaskProcesses:
    """A real `dask scheduler` and `dask worker`s on 127.0.0.1, each its own process."""

    def __init__(self, folder: Path, n_workers: int):
        self.folder, self.scheduler_file = folder, folder / "scheduler.json"
        self.scheduler = self._start("distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                     "--port", "0", "--no-dashboard")
        self.workers = {f"w{i}": self._start("distributed.cli.dask_worker", "--nthreads", "1",
                                             "--no-nanny", "--no-dashboard", "--name", f"w{i}",
                                             "--host", "127.0.0.1") for i in range(n_workers)}
        with distributed.Client(scheduler_file=str(self.scheduler_file), timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=60)
            self.address = client.scheduler.address

    def _start(self, module, *args):
        log = open(self.folder / f"{module.rsplit('_', 1)[1]}-{time.monotonic_ns()}.log", "w")
        return subprocess.Popen([sys.executable, "-m", module, "--scheduler-file", str(self.scheduler_file),
                                 *args], stdout=log, stderr=subprocess.STDOUT)

    def stop(self):
        for process in [*self.workers.values(), self.scheduler]:
            process.terminate()
        for process in [*self.workers.values(), self.scheduler]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def dask_processes(tmp_path):
    """A cluster of its own, for tests that change or kill its workers."""
    processes = DaskProcesses(tmp_path, n_workers=2)
    yield processes
    processes.stop()


@pytest.fixture(scope="module")
def shared_dask_processes(tmp_path_factory):
    processes = DaskProcesses(tmp_path_factory.mktemp("dask"), n_workers=2)
    yield processes
    processes.stop()


def test_a_sweep_on_a_local_cluster_matches_one_local_job(local_sweep, tmp_path):
    out = tmp_path / "dask-local"
    code = main(["ablate", "--preset", "tiny", "--data", DATA, "--variants", VARIANTS, "--seeds", str(SEEDS),
                 "--out", str(out), "--dask", "local", "--jobs", "2", "--quiet", "--no-plots"])
    assert code == 0
    assert_same_sweep(local_sweep, out)
    # the client writes what a local run leaves behind: metrics for the plots, the checkpoint
    assert (out / "runs" / "abb-seed1" / "metrics.jsonl").exists()
    assert (out / "runs" / "abb-seed1" / "ckpt.npz").exists()


def test_a_dask_sweep_on_a_folder_in_use_is_refused_before_any_worker_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "LocalCluster", lambda **kwargs: pytest.fail("a cluster was started"))
    with folder_lock(tmp_path, "sweep folder"), pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
        sweep(tmp_path, dask="local", jobs=2)
    assert not (tmp_path / "runs").exists()


class NoCluster(Exception):
    """Raised by a stand-in for LocalCluster once it has recorded what it was asked for."""


def test_a_local_cluster_starts_one_worker_per_run_to_do_at_most(tmp_path, monkeypatch):
    asked = {}

    def local_cluster(**kwargs):
        asked.update(kwargs)
        raise NoCluster

    monkeypatch.setattr(distributed, "LocalCluster", local_cluster)
    with pytest.raises(NoCluster):
        sweep(tmp_path, dask="local", jobs=12)  # 2 variants x 2 seeds
    assert asked["n_workers"] == 4


def test_a_sweep_on_a_scheduler_and_two_worker_processes_matches_one_local_job(
        local_sweep, shared_dask_processes, tmp_path):
    sweep(tmp_path / "dask", dask=shared_dask_processes.address)
    assert_same_sweep(local_sweep, tmp_path / "dask")


def test_rerunning_a_dask_sweep_skips_finished_runs_and_redoes_missing_ones(
        local_sweep, shared_dask_processes, tmp_path):
    out = tmp_path / "dask"
    sweep(out, dask=shared_dask_processes.address)
    kept = out / "runs" / "abc-seed0" / "result.json"
    kept_time = kept.stat().st_mtime_ns
    (out / "runs" / "abb-seed1" / "result.json").unlink()
    sweep(out, dask=shared_dask_processes.address)
    assert kept.stat().st_mtime_ns == kept_time
    assert_same_sweep(local_sweep, out)


def test_two_workers_on_one_machine_share_its_cores_between_their_runs(shared_dask_processes):
    with distributed.Client(shared_dask_processes.address) as client:
        threads = cluster.threads_per_run(client)
    assert len(threads) == 2
    assert set(threads.values()) == {max(1, cluster.usable_cores() // 2)}


def test_a_worker_running_another_minqkv_is_refused_before_any_training(dask_processes, tmp_path):
    with distributed.Client(dask_processes.address) as client:
        client.run(exec, "import minqkv; minqkv.__version__ = '0.0.1'")
    with pytest.raises(RuntimeError, match=r"runs minqkv 0\.0\.1 .* install the same minqkv on every worker"):
        sweep(tmp_path / "dask", dask=dask_processes.address)
    assert not (tmp_path / "dask" / "runs").exists()


def test_a_task_refuses_a_client_of_another_version():
    other = {**cluster.fingerprint(), "c_core": "0" * 64}
    with pytest.raises(RuntimeError, match="C core 000000000000"):
        cluster.check_fingerprint(other)


def test_killing_a_worker_mid_sweep_loses_no_run(local_sweep, dask_processes, tmp_path):
    out = tmp_path / "dask"
    finished = threading.Event()
    sweeping = threading.Thread(target=lambda: (sweep(out, dask=dask_processes.address), finished.set()))
    sweeping.start()
    with distributed.Client(dask_processes.address) as client:
        victim = _wait_until_busy(client, "w0")
    os.kill(dask_processes.workers["w0"].pid, signal.SIGKILL)
    sweeping.join(timeout=120)
    assert finished.is_set(), "the sweep did not finish after a worker was killed"
    assert victim, "w0 was killed while it held a run"
    assert_same_sweep(local_sweep, out)


def test_a_run_that_fails_on_its_worker_is_tried_twice_then_recorded_with_its_error(dask_processes, tmp_path):
    with distributed.Client(dask_processes.address) as client:  # every training process now fails
        client.run(exec, "import os; os.environ['MINQKV_NUM_THREADS'] = 'zero'")
    out = tmp_path / "dask"
    rows = ablate.run_sweep("tiny", DATA, out, "abc", seeds=1, progress=False, dask=dask_processes.address)
    assert rows[0]["failed"] == 1 and "MINQKV_NUM_THREADS='zero'" in rows[0]["errors"][0]
    result = json.loads((out / "runs" / "abc-seed0" / "result.json").read_text())
    assert result["status"] == "failed" and result["attempts"] == 2
    assert "MINQKV_NUM_THREADS='zero'" in (out / "results.md").read_text()


def _wait_until_busy(client, name: str, timeout: float = 60) -> list:
    """The keys of the tasks the named worker holds, as soon as it holds one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = client.scheduler_info()["workers"]
        address = next(a for a, w in workers.items() if w["name"] == name)
        keys = client.processing([address])[address]
        if keys:
            return keys
        time.sleep(0.05)
    return []


def test_a_file_corpus_travels_with_the_task_and_the_run_records_the_users_path(tmp_path):
    plan = ablate.plan_sweep("tiny", DATA, "abc")
    text = "".join(f"line {i}: to be or not to be\n" for i in range(200))
    job = {**plan["runs"][0], "seed": 0, "run_dir": str(tmp_path / "run"), "data": "notes-on-the-client.txt",
           "model": plan["model"], "train": {**plan["train"], "steps": 2}}
    result = cluster.train_in_fresh_process(job, text, threads=1, backend=None)
    assert result["status"] == "ok", result.get("error")
    assert result["data"] == "notes-on-the-client.txt"
    assert not Path("notes-on-the-client.txt").exists()


def test_without_distributed_the_dask_flag_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now fails
    with pytest.raises(RuntimeError, match=r"pip install 'minqkv\[dask\]'"):
        cluster.require_distributed()


def test_the_c_core_records_the_hash_of_the_sources_it_was_built_from():
    kernels = pytest.importorskip("minqkv._ccore", reason="the C core is not built")
    csrc = Path(__file__).parent.parent / "csrc"
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.iterdir() if p.suffix in (".c", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    assert kernels.ffi.string(kernels.lib.minqkv_csrc_sha256()).decode() == digest.hexdigest()
    assert cluster.fingerprint()["c_core"] == digest.hexdigest()
