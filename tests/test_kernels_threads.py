"""minqkv.kernels under Python threads: every C entry point called from several threads at once,
while yet another thread keeps changing the thread count.

cffi releases the GIL during a C call, so these calls really overlap. A kernel that shares
state between calls, or a Python wrapper that reads a setting twice (once to size a buffer,
once for the C call), corrupts memory here. A crash would take pytest down with it, so the
threads run in a child process (this file run as a script) and the test reads its exit status.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import minqkv
from minqkv import kernels

SECONDS = 4.0  # of hammering; a wrapper that read the count twice crashed within a second


def cases():
    """(name, call, want): each C entry point on arrays big enough to run on several OpenMP
    threads, and the NumPy twin's answer."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((330, 330)).astype(np.float32)  # 72 Mflop: above the parallel threshold
    stack = rng.standard_normal((3, 130, 140))  # a batch that threads cannot share evenly
    small = rng.standard_normal((40, 50)).astype(np.float32)  # the naive GEMM is slow: keep it small
    scores = rng.standard_normal((32, 130, 128)).astype(np.float32)
    y = kernels.softmax_numpy(scores, causal=True)
    dy = rng.standard_normal(scores.shape).astype(np.float32)
    x = rng.standard_normal((1200, 128)).astype(np.float32)  # 154k elements: above the parallel threshold
    weight, bias = rng.standard_normal(128).astype(np.float32), rng.standard_normal(128).astype(np.float32)
    dx = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, rstd = kernels.layer_norm_numpy(x, weight, bias)
    targets = rng.integers(-1, 128, 1200)
    adam_state = [rng.standard_normal(300_000).astype(np.float32) for _ in range(3)]
    adam_state.append(np.abs(adam_state[2]))
    adam_hyper = (0.9, 0.95, 0.999, 1e-3, 0.3, 1e-8)

    def adamw(update):  # a fresh copy of the state per call; the updated (param, m, v) as one array
        param, grad, m, v = (array.copy() for array in adam_state)
        update(param, grad, m, v, *adam_hyper)
        return np.concatenate([param, m, v])

    def joined(arrays):  # kernels that return several arrays, as one array to compare
        return np.concatenate([array.ravel() for array in arrays])

    q, k, v = (rng.standard_normal((2, 4, 130, 32)).astype(np.float32) for _ in range(3))
    pos_bias = rng.standard_normal((4, 130, 130)).astype(np.float32)
    y_attention, lse = kernels.attention_numpy(q, k, v, pos_bias)
    q_small, k_small, v_small = (array[:1, :2, :40] for array in (q, k, v))  # the naive pass is slow
    return [
        ("attention_c", lambda: joined(kernels.attention_c(q, k, v, pos_bias)), joined((y_attention, lse))),
        ("attention_backward_c", lambda: joined(kernels.attention_backward_c(q, k, v, pos_bias, y_attention, lse, q)),
         joined(kernels.attention_backward_numpy(q, k, v, pos_bias, y_attention, lse, q))),
        ("attention_naive_c", lambda: joined(kernels.attention_naive_c(q_small, k_small, v_small)),
         joined(kernels.attention_numpy(q_small, k_small, v_small))),
        ("gelu_c", lambda: kernels.gelu_c(x), kernels.gelu_numpy(x)),
        ("gelu_backward_c", lambda: kernels.gelu_backward_c(x, dx), kernels.gelu_backward_numpy(x, dx)),
        ("layer_norm_c", lambda: joined(kernels.layer_norm_c(x, weight, bias)),
         joined(kernels.layer_norm_numpy(x, weight, bias))),
        ("layer_norm_backward_c", lambda: joined(kernels.layer_norm_backward_c(x, weight, mean, rstd, dx)),
         joined(kernels.layer_norm_backward_numpy(x, weight, mean, rstd, dx))),
        ("add_c", lambda: kernels.add_c(x, dx), kernels.add_numpy(x, dx)),
        ("column_sums_c", lambda: kernels.column_sums_c(x), kernels.column_sums_numpy(x)),
        ("cross_entropy_c", lambda: joined(kernels.cross_entropy_c(x, targets, -1, 0.01)),
         joined(kernels.cross_entropy_numpy(x, targets, -1, 0.01))),
        ("adamw_update_c", lambda: adamw(kernels.adamw_update_c), adamw(kernels.adamw_update_numpy)),
        ("matmul_c", lambda: kernels.matmul_c(a, a), kernels.matmul_numpy(a, a)),
        ("matmul_c, bias, add_to", lambda: kernels.matmul_c(a, a, bias=a[0], add_to=a.copy()),
         kernels.matmul_numpy(a, a, bias=a[0], add_to=a.copy())),
        ("matmul_c batched, a^T", lambda: kernels.matmul_c(stack, stack, trans_a=True),
         kernels.matmul_numpy(stack, stack, trans_a=True)),
        ("matmul_c, a^T, split along K", lambda: kernels.matmul_c(x[:, :100], dx[:, :96], trans_a=True),
         kernels.matmul_numpy(x[:, :100], dx[:, :96], trans_a=True)),
        ("matmul_naive_c", lambda: kernels.matmul_naive_c(small, small, trans_b=True),
         kernels.matmul_numpy(small, small, trans_b=True)),
        ("softmax_c", lambda: kernels.softmax_c(scores, causal=True), y),
        ("softmax_backward_c", lambda: kernels.softmax_backward_c(y, dy), kernels.softmax_backward_numpy(y, dy)),
    ]


def hammer(seconds=SECONDS):
    """Call each case in a loop, each in its own thread, for `seconds`, while another thread
    flips the thread count between 1 and 2; return the names of the cases that gave a wrong
    result (empty when all is well)."""
    sys.setswitchinterval(1e-6)  # switch Python threads as often as possible
    stop = threading.Event()
    wrong = []

    def flip():
        i = 0
        while not stop.is_set():
            kernels.set_num_threads(1 + i % 2)
            i += 1

    def work(name, call, want):
        while not stop.is_set():
            if not np.array_equal(call(), want):
                wrong.append(name)

    # Each result must match the NumPy twin; then, inside the threads, the bits of the result
    # computed here, alone (results do not depend on the thread count, and comparing bits is
    # quick, which keeps the threads busy in C rather than in the checks).
    threads = [threading.Thread(target=flip)]
    for name, call, twin in cases():
        alone = call()
        if alone.shape != twin.shape or not np.allclose(alone, twin, rtol=1e-4, atol=1e-4):
            wrong.append(name)
        threads.append(threading.Thread(target=work, args=(name, call, alone)))
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return wrong


@pytest.mark.skipif(not kernels.HAVE_C, reason="the C extension minqkv._ccore is not built (pip install -e .)")
def test_c_kernels_give_numpy_results_from_many_threads_while_the_thread_count_changes():
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(minqkv.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True,
                          env=env, timeout=120)  # the child imports the minqkv under test; a hang fails too
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.split() == ["no", "wrong", "results"], done.stdout + done.stderr


if __name__ == "__main__":
    wrong = hammer()
    print(f"wrong results: {sorted(set(wrong))}" if wrong else "no wrong results")
    sys.exit(1 if wrong else 0)


# ---- the wait policy chosen at import (runtime.choose_wait_policy): decided from numbers, no timing

from minqkv.kernels.runtime import choose_wait_policy, wait_policy_for_children  # noqa: E402


def test_threads_sleep_at_once_when_the_machine_is_busy():
    assert choose_wait_policy(load_1min=2.0, cores=2, threads=2, environ={}) == "PASSIVE"


def test_threads_keep_libgomps_spin_on_an_idle_machine():
    assert choose_wait_policy(load_1min=0.1, cores=16, threads=16, environ={}) is None


def test_a_single_thread_never_changes_the_policy():
    assert choose_wait_policy(load_1min=8.0, cores=2, threads=1, environ={}) is None


def test_an_unknown_load_leaves_libgomp_alone():
    assert choose_wait_policy(load_1min=None, cores=2, threads=2, environ={}) is None


@pytest.mark.parametrize("environ", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"},
                                     {"MINQKV_WAIT_POLICY": "spin"}])
def test_the_users_choice_wins_on_a_busy_machine(environ):
    assert choose_wait_policy(load_1min=8.0, cores=2, threads=2, environ=environ) is None


def test_minqkv_wait_policy_passive_forces_it_on_an_idle_machine():
    assert choose_wait_policy(load_1min=0.0, cores=16, threads=16, environ={"MINQKV_WAIT_POLICY": "passive"}) == "PASSIVE"


def test_an_unknown_minqkv_wait_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="MINQKV_WAIT_POLICY='sometimes'"):
        choose_wait_policy(load_1min=0.0, cores=2, threads=2, environ={"MINQKV_WAIT_POLICY": "sometimes"})


def test_children_inherit_the_parents_policy_instead_of_guessing_again(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert wait_policy_for_children() == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert wait_policy_for_children() == {"MINQKV_WAIT_POLICY": "spin"}


def test_a_busy_import_sets_omp_wait_policy_before_libgomp_starts():
    code = "import os, minqkv.kernels.runtime as r; print(r.WAIT_POLICY_SET, os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], env=dict(env, MINQKV_WAIT_POLICY="passive"),
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["PASSIVE", "PASSIVE"]
