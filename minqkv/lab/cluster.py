"""Sweeps on a Dask cluster: every run of an ablation is one task, trained wherever a worker is free.

`minqkv ablate --dask tcp://HOST:8786` (or `--dask local`) sends the runs that the local path would
start as processes to Dask's distributed scheduler instead. Workers share no folder with the client:

    client                                  worker (any machine with the same minqkv)
    ------                                  ------
    check every worker's fingerprint
    submit run_task(task) per run   ---->   check the fingerprint again (a worker may join late)
      task = job + corpus text (files)      train in a fresh process (python -m minqkv.lab.cluster)
                                            in a temporary folder, reporting steps as it goes
    write the run's files and        <----  return the result record and the run's files
      result.json as each task ends           (metrics, final.json and, optionally, checkpoints)
    aggregate and write the tables as the local path does

Each run trains with MINQKV_NUM_THREADS threads: the worker's own setting if its environment has
one, else its machine's cores shared among all the Dask threads of the workers on that machine.
A run that fails, or whose worker is lost for good, is tried once more; Dask itself already moves
the tasks of a worker that dies to the others. Ctrl-C cancels the tasks that have not finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue as queue_module
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ..atomic import json_text, write_atomically
from ..lock import LOCK_NAME
from .ablate_run import ATTEMPTS, run_one

INSTALL_HINT = "pip install 'minqkv[dask]' (or pip install distributed)"
PROGRESS_PREFIX = "minqkv-step "  # a line the training process prints after each step


def require_distributed():
    """The `distributed` module, or an error that says how to install it."""
    try:
        import distributed
    except ImportError:
        raise RuntimeError(f"--dask needs Dask's distributed scheduler, which is not installed: "
                           f"{INSTALL_HINT}") from None
    return distributed


# ---- the same minqkv on both sides ----------------------------------------------------------


def fingerprint() -> dict:
    """What makes two minqkv installs train alike: version, C core sources, Python sources (every
    module of the package, kernels/ and lab/ included)."""
    import minqkv

    package = Path(minqkv.__file__).parent
    python = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        python.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"version": minqkv.__version__, "c_core": _c_core_hash(), "python": python.hexdigest()}


def _c_core_hash() -> str:
    try:
        from .. import _ccore
    except ImportError:
        return "not built"
    if not hasattr(_ccore.lib, "minqkv_csrc_sha256"):  # built before the hash was recorded
        return "unknown"
    return _ccore.ffi.string(_ccore.lib.minqkv_csrc_sha256()).decode()


def _describe(install: dict) -> str:
    return (f"minqkv {install['version']} (C core {install['c_core'][:12]}, "
            f"Python sources {install['python'][:12]})")


def _refusal(worker: str, theirs: dict, ours: dict) -> RuntimeError:
    return RuntimeError(f"{worker} runs {_describe(theirs)} but the client runs {_describe(ours)}: "
                        f"install the same minqkv on every worker and the client, then start the "
                        f"workers again")


def check_fingerprint(client_print: dict) -> None:
    """Refuse to train for a client that runs another minqkv: the results would not compare."""
    mine = fingerprint()
    if mine != client_print:
        raise _refusal("this worker", mine, client_print)


def _check_workers(client, client_print: dict) -> None:
    try:
        prints = client.run(fingerprint)
    except ImportError as e:
        raise RuntimeError(f"a Dask worker cannot import minqkv ({e}): install the same minqkv "
                           f"on every worker") from None
    for address, worker_print in sorted(prints.items()):
        if worker_print != client_print:
            raise _refusal(f"worker {address}", worker_print, client_print)


# ---- on the worker: one run in a temporary folder ----------------------------------------------


def run_task(task: dict) -> dict:
    """Train one run on this worker; -> {'result': record, 'files': {relative path: bytes}}.

    Its steps reach the client's progress bar as Dask events on the sweep's own topic.
    """
    from distributed import get_worker

    check_fingerprint(task["fingerprint"])
    worker = get_worker()
    key = f"{task['job']['variant']} seed {task['job']['seed']}"
    # the worker's own MINQKV_NUM_THREADS wins; a worker that joined after the sweep started
    # shares its cores among its own threads
    threads = (os.environ.get("MINQKV_NUM_THREADS") or task["threads"].get(worker.address)
               or max(1, usable_cores() // worker.state.nthreads))

    def report(step):
        worker.log_event(task["topic"], [key, step])

    with tempfile.TemporaryDirectory(prefix="minqkv-run-") as tmp:
        run_dir = Path(tmp) / "run"
        job = {**task["job"], "run_dir": str(run_dir)}
        result = train_in_fresh_process(job, task["text"], threads, task["backend"], report)
        return {"result": result, "files": _run_files(run_dir, task["checkpoints"])}


def train_in_fresh_process(job: dict, text, threads, backend, report=None) -> dict:
    """run_one(job) (ablate_run.py) in a new Python process, as the local path runs it.

    A fresh process keeps each run's peak memory its own and gets its thread count from the
    environment; `text` is the corpus file's content when the job's data is a file path.
    """
    threads = str(threads)
    env = {**os.environ, "MINQKV_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "OMP_NUM_THREADS": threads}
    if backend:
        env["MINQKV_BACKEND"] = backend
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "minqkv.lab.cluster"], env=env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        process.stdin.write(json.dumps({"job": job, "text": text}))
        process.stdin.close()
        for line in process.stdout:
            if line.startswith(PROGRESS_PREFIX) and report is not None:
                report(int(line[len(PROGRESS_PREFIX):]))
        code = process.wait()
        done = run_dir / "result.json"
        if not done.exists():  # run_one records its own errors; this process died before it could
            stderr.seek(0)
            last_lines = "".join(stderr.readlines()[-5:]).strip()
            raise RuntimeError(f"the training process exited with code {code}: {last_lines}")
    return json.loads(done.read_text())


def _run_files(run_dir: Path, checkpoints: bool) -> dict:
    """Everything the run wrote but result.json (the client writes that last, as 'finished') and
    the worker's lock file."""
    files = {}
    for path in sorted(run_dir.rglob("*")):
        name = path.relative_to(run_dir).as_posix()
        skip = (name in ("result.json", LOCK_NAME) or path.suffix == ".tmp"
                or (path.suffix == ".npz" and not checkpoints))
        if path.is_file() and not skip:
            files[name] = path.read_bytes()
    return files


# ---- in the training process -----------------------------------------------------------------


class _StdoutProgress:
    """Stands in for run_one's progress queue: prints each step for the worker to forward.

    When the worker dies, this process is orphaned (its parent changes); it stops at the next
    step instead of training for nobody.
    """

    def __init__(self):
        self.parent = os.getppid()

    def put(self, item) -> None:
        if os.getppid() != self.parent:
            os._exit(1)
        print(PROGRESS_PREFIX + str(item[1]), flush=True)


def _main() -> None:
    from ..data import text_corpus

    message = json.load(sys.stdin)
    job, text = message["job"], message["text"]
    # the worker has no such file: the shipped text under the user's name, so the run records that path
    corpus = text_corpus(job["data"], text) if text is not None else None
    run_one(job, _StdoutProgress(), corpus)


# ---- on the client ---------------------------------------------------------------------------


def run_on_cluster(address: str, jobs_todo: list, n_jobs: int, steps: int, progress: bool,
                   checkpoints: bool = True) -> list:
    """Train jobs_todo on the Dask cluster at `address` ('local': a LocalCluster of n_jobs
    workers, fewer when fewer runs are left); save each run into its run_dir as it arrives;
    -> the result records."""
    distributed = require_distributed()
    if not jobs_todo:
        return []
    # --dask local: one run per worker process, as --jobs runs one per process; no idle workers
    workers = min(n_jobs, len(jobs_todo))
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None) if address == "local" else None
    try:
        with _connect(distributed, cluster or address) as client:
            client_print = fingerprint()
            _check_workers(client, client_print)
            topic = f"minqkv-sweep-{uuid.uuid4().hex}"  # this sweep's progress events
            threads = threads_per_run(client)
            text = _text_to_ship(jobs_todo[0]["data"])  # a sweep trains every run on one corpus
            tasks = [_task(job, text, client_print, threads, checkpoints, topic) for job in jobs_todo]
            return _submit_and_collect(client, tasks, topic, steps, progress)
    finally:
        if cluster is not None:
            cluster.close()


def _connect(distributed, address):
    try:
        return distributed.Client(address)
    except OSError as e:
        raise RuntimeError(f"could not reach a Dask scheduler at {address} ({e}): start one with "
                           f"'dask scheduler' and pass the address it prints, e.g. --dask "
                           f"tcp://HOST:8786, or use --dask local") from None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what a batch system (Slurm, ...) gave this process
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_run(client) -> dict:
    """{worker address: threads per run}: a machine's cores shared among all the Dask threads
    (runs trained at once) of the workers on it, since several workers may share one machine."""
    workers = client.scheduler_info()["workers"]
    cores = client.run(usable_cores)
    slots_on_host = {}
    for worker in workers.values():
        slots_on_host[worker["host"]] = slots_on_host.get(worker["host"], 0) + worker["nthreads"]
    return {address: max(1, cores[address] // slots_on_host[worker["host"]])
            for address, worker in workers.items()}


def _text_to_ship(data: str):
    """A file's text travels with each task; Shakespeare and the synthetic tasks are made on the worker."""
    from ..data import read_text_file

    return None if data == "shakespeare" or data.startswith("synthetic:") else read_text_file(data)


def _task(job: dict, text, client_print: dict, threads: dict, checkpoints: bool, topic: str) -> dict:
    return {"job": {k: v for k, v in job.items() if k != "run_dir"}, "run_dir": job["run_dir"],
            "text": text, "fingerprint": client_print, "threads": threads, "checkpoints": checkpoints,
            "backend": os.environ.get("MINQKV_BACKEND"), "topic": topic}


def _submit_and_collect(client, tasks: list, topic: str, steps: int, progress: bool) -> list:
    from tqdm import tqdm

    events = queue_module.Queue()
    client.subscribe_topic(topic, lambda event: events.put(event[1]))
    bar = tqdm(total=len(tasks) * steps, disable=not progress, unit="step",
               desc=f"{len(tasks)} runs on Dask", dynamic_ncols=True)
    pending = {client.submit(run_task, task, pure=False): (task, 1) for task in tasks}
    current, finished, results = {}, set(), []
    try:
        while pending:
            time.sleep(0.2)
            _show_event_steps(events, current, finished, bar)
            for future in [f for f in pending if f.done()]:
                task, attempt = pending.pop(future)
                result, files = _result_of_task(future)
                key = f"{task['job']['variant']} seed {task['job']['seed']}"
                shown = current.pop(key, 0)
                if result["status"] != "ok" and attempt < ATTEMPTS:
                    bar.write(f"{key}: attempt {attempt} failed ({result['error']}); trying again")
                    bar.update(-shown)
                    pending[client.submit(run_task, task, pure=False)] = (task, attempt + 1)
                    continue
                finished.add(key)
                bar.update(steps - shown)
                if result["status"] != "ok":
                    bar.write(f"{key}: FAILED: {result['error']}")
                    result["attempts"] = attempt
                results.append(_save(task, result, files))
            bar.set_postfix_str(", ".join(f"{k} step {s}" for k, s in current.items()))
    except KeyboardInterrupt:
        client.cancel(list(pending))
        raise
    finally:
        bar.close()
        client.unsubscribe_topic(topic)
    return results


def _result_of_task(future) -> tuple:
    """(result record, files) of a finished task; a task that raised (a lost worker, a refused
    fingerprint) becomes a failed record like one from run_one."""
    try:
        answer = future.result()
    except Exception as e:
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}, {}
    return answer["result"], answer["files"]


def _save(task: dict, result: dict, files: dict) -> dict:
    """Write the run's files, then result.json, so a folder with result.json is a finished run."""
    job = task["job"]
    result.update(label=job["label"], variant=job["variant"], seed=job["seed"])
    run_dir = Path(task["run_dir"])
    for name, content in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir / name, content)
    run_dir.mkdir(parents=True, exist_ok=True)  # a failed run may have sent no files
    write_atomically(run_dir / "result.json", json_text(result, indent=2) + "\n")
    return result


def _show_event_steps(events, current: dict, finished: set, bar) -> None:
    """Move the bar by the steps the runs have reported as Dask events since the last look."""
    while True:
        try:
            key, step = events.get_nowait()
        except queue_module.Empty:
            return
        if key not in finished:  # an event can arrive after its run's result
            bar.update(step - current.get(key, 0))
            current[key] = step


if __name__ == "__main__":
    _main()
