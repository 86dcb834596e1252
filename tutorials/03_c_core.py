# %% [markdown]
# # Lesson 3: the C core, and why the same sums can run 100 times faster
#
# Run: `python tutorials/03_c_core.py [--out FOLDER]` (times: tutorials/README.md). Draws
# `03_gemm_speed.png`.
# `--sizes 64,128,256,512,1024` also times n = 1024 (the naive loop then takes seconds per
# product): the gap between the two C GEMMs keeps widening as the matrices outgrow the caches.
#
# Almost all the time a Transformer spends goes into two things: matrix products (GEMM,
# "general matrix multiply") and softmax. minqkv computes both in a small C library, `csrc/`,
# and keeps a few lines of NumPy beside each kernel that compute the same thing. This lesson
# looks at how Python calls C, why the fast GEMM is fast, why softmax subtracts a maximum, and
# how to switch the whole engine to NumPy.

# %%
import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # NumPy's GEMM on one thread too: read when NumPy loads
import numpy as np  # noqa: E402

import minqkv  # noqa: E402
from minqkv import kernels  # noqa: E402
from minqkv.model import GPT, GPTConfig  # noqa: E402
from minqkv.tensor import no_grad  # noqa: E402

parser = argparse.ArgumentParser(description="Lesson 3: the C core")
parser.add_argument("--out", default=None, help="folder for the PNG (default: a temporary folder)")
parser.add_argument("--sizes", default="64,128,256,512", help="square matrix sizes to time, comma-separated")
args, _ = parser.parse_known_args()
out = Path(args.out or tempfile.mkdtemp(prefix="minqkv-lesson03-"))
out.mkdir(parents=True, exist_ok=True)
sizes = [int(n) for n in args.sizes.split(",")]

# %% [markdown]
# ## 1. What cffi does
#
# C functions cannot be called from Python directly: someone has to convert Python objects to C
# types and back. **cffi** does it from the C declarations themselves. At install time
# (`pip install -e .`), `minqkv/_build.py` hands cffi the header `csrc/minqkv.h` and the `.c`
# files; cffi writes a small wrapper, the C compiler builds it into an extension module,
# `minqkv._ccore`, with two attributes: `lib` (the C functions, callable from Python) and `ffi`
# (helpers to build C values).
#
# The only C value minqkv needs is a pointer to the first element of an array. `ffi.from_buffer`
# makes one from a NumPy array **without copying**: C reads and writes the very memory NumPy
# owns. So the Python side does all the checking (dtypes, shapes, contiguity, with readable
# errors), allocates the output with NumPy, and passes pointers, sizes and strides. Here is the
# whole Python side of softmax:

# %%
print("C core built and loaded:", kernels.HAVE_C)
print(inspect.getsource(kernels.softmax_c))

# %% [markdown]
# The header is the whole contract between the two sides. If this checkout has it (an editable
# install does), here are the declarations of the two GEMMs:

# %%
header = Path(minqkv.__file__).resolve().parent.parent / "csrc" / "minqkv.h"
if header.exists():
    text = header.read_text()
    start = text.index("int minqkv_gemm_f32(")
    print(text[start:text.index(";", start) + 1])
    start = text.index("int minqkv_gemm_naive_f32(")
    print(text[start:text.index(";", start) + 1])

# %% [markdown]
# ## 2. Two GEMMs that compute the same numbers
#
# C = A B for A (M, K) and B (K, N) is, by definition, M * N dot products:
#
#     for i in range(M):
#         for j in range(N):
#             C[i, j] = sum(A[i, p] * B[p, j] for p in range(K))
#
# `kernels.matmul_naive_c` is exactly those three loops in C. `kernels.matmul_c` computes the
# same sums in another order:
#
# * **register tiles**: a small block of C (a few rows by a few columns) stays in the CPU's
#   registers while K is walked, so each number loaded from memory is used many times;
# * **packing**: the pieces of A and B it needs next are first copied into small contiguous
#   panels, in exactly the order they will be read;
# * **cache blocking**: those panels are sized to stay in the fast caches (L1, L2);
# * **threads**: large products are split between cores.
#
# The naive loop reads B down a column, jumping a whole row of memory at every step, so it
# waits on memory most of the time. Same arithmetic, very different speed. We time both C
# GEMMs on one thread (the naive one has only one), next to NumPy, which calls OpenBLAS (the
# same ideas tuned by experts). OpenBLAS reads its thread count once, when NumPy is loaded: the
# first cell set `OPENBLAS_NUM_THREADS=1` before importing NumPy, so all three lines measure
# one core (in a notebook, only if that cell ran before anything else imported NumPy; the
# label says what OpenBLAS was asked for). On a busy machine a many-threaded OpenBLAS waits
# for its slowest thread, and its line jumps up and down from one size to the next.
#
# Timings on a shared machine are noisy: another program can take the core in the middle of
# one measurement. So the three functions take turns, round after round (a burst of load then
# slows all three alike, instead of one of them), and we keep each one's fastest round, the one
# least disturbed; the median is printed beside it. Even so the numbers are only printed and
# drawn, never asserted.

# %%
threads_before = kernels.get_num_threads()
kernels.set_num_threads(1)


def seconds_per_call(fn, A, B, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(A, B)
    return (time.perf_counter() - t0) / calls


rng = np.random.default_rng(0)
gemms = {"naive": kernels.matmul_naive_c, "blocked": kernels.matmul_c, "NumPy": np.matmul}
labels = {"naive": "naive C, 1 thread", "blocked": "blocked C, 1 thread",
          "NumPy": f"NumPy / OpenBLAS, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"}
timings = {name: [] for name in gemms}  # the fastest round per size, in seconds per product
rounds = 5
for n in sizes:
    A = rng.standard_normal((n, n)).astype(np.float32)
    B = rng.standard_normal((n, n)).astype(np.float32)
    naive, blocked = kernels.matmul_naive_c(A, B), kernels.matmul_c(A, B)
    # float32 sums in another order round differently: equal to about 1e-6 of their size
    assert np.allclose(naive, blocked, rtol=1e-4, atol=1e-4 * np.sqrt(n))
    assert np.allclose(blocked, A.astype(np.float64) @ B, rtol=1e-4, atol=1e-4 * np.sqrt(n))
    calls = max(1, 2 ** 23 // n ** 3)  # small products repeated: a round of a few microseconds is all noise
    per_round = {name: [] for name in gemms}
    for _ in range(rounds):  # the three take turns: load hits all of them, not one
        for name, fn in gemms.items():
            per_round[name].append(seconds_per_call(fn, A, B, calls))
    for name in gemms:
        timings[name].append(min(per_round[name]))
    cells = [f"{name} {1e3 * min(t):7.2f} ms (median {1e3 * np.median(t):7.2f})" for name, t in per_round.items()]
    ratio = min(per_round["naive"]) / min(per_round["blocked"])
    print(f"n={n:4}:  " + "   ".join(cells) + f"   naive/blocked = {ratio:5.1f}x")
kernels.set_num_threads(threads_before)

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 4))
for name, seconds in timings.items():
    gflops = [2 * n ** 3 / s / 1e9 for n, s in zip(sizes, seconds)]
    ax.plot(sizes, gflops, marker="o", label=labels[name])
ax.set(xscale="log", yscale="log", xlabel="n (n x n times n x n, float32)",
       ylabel="GFLOP/s, fastest of 5 rounds", title="the same sums, in a different order")
ax.set_xticks(sizes, [str(n) for n in sizes])
ax.minorticks_off()
ax.legend()
fig.savefig(out / "03_gemm_speed.png", dpi=110, bbox_inches="tight")
plt.close(fig)
print("wrote", out / "03_gemm_speed.png")

# %% [markdown]
# ## 3. Softmax subtracts the maximum
#
# softmax(x)_i = exp(x_i) / sum_j exp(x_j) turns scores into weights that are positive and sum
# to one. Written literally it breaks on large scores: exp(100) already overflows float32
# (it is about 2.7e43, and float32 stops at 3.4e38), giving inf / inf = NaN.
#
# Dividing the top and bottom by the same exp(m) changes nothing mathematically:
#
#     exp(x_i) / sum_j exp(x_j)  =  exp(x_i - m) / sum_j exp(x_j - m)
#
# and with m = max(x) every exponent is <= 0, so nothing overflows and the largest term is
# exactly 1. Both the C kernel and its NumPy twin do this.

# %%
scores = np.array([[100.0, 101.0, 102.0]], dtype=np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    literal = np.exp(scores) / np.exp(scores).sum(axis=-1, keepdims=True)
shifted = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
print("literal formula:", literal, "  max subtracted:", shifted, "  kernels.softmax:", kernels.softmax(scores))
assert np.isnan(literal).all()
assert np.allclose(kernels.softmax(scores), shifted)
assert np.allclose(kernels.softmax(scores), kernels.softmax(scores - 100.0))  # shifting changes nothing

# %% [markdown]
# ## 4. The NumPy twins and `MINQKV_BACKEND=numpy`
#
# Every C kernel has a twin with the same signature: `matmul_numpy`, `softmax_numpy`,
# `softmax_backward_numpy`. They are a few lines each, the reference the C is tested against,
# and the fallback when no C compiler was available. The functions the engine calls,
# `kernels.matmul` and `kernels.softmax`, dispatch to one or the other by the **backend**, which
# starts from the environment variable `MINQKV_BACKEND` and can be switched with
# `kernels.set_backend`. Here the same small GPT runs on both:

# %%
x = rng.standard_normal((4, 7, 9)).astype(np.float32)
assert np.allclose(kernels.softmax_c(x, causal=True), kernels.softmax_numpy(x, causal=True), atol=1e-6)

model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32))
ids = rng.integers(0, 20, (2, 16))
logits_by_backend = {}
backend_before = kernels.get_backend()  # "c", unless MINQKV_BACKEND said otherwise
for backend in ("c", "numpy"):
    kernels.set_backend(backend)
    with no_grad():
        logits_by_backend[backend] = model(ids)[0].data
kernels.set_backend(backend_before)
gap = np.abs(logits_by_backend["c"] - logits_by_backend["numpy"]).max()
print(f"GPT logits, C core against NumPy twins: max difference {gap:.1e} (float32 rounding)")
assert gap < 1e-4

# %% [markdown]
# The environment variable sets the backend for a whole program, e.g.
# `MINQKV_BACKEND=numpy minqkv train ...` to run everything on NumPy (handy for stepping through
# the math in a debugger). A child process shows it:

# %%
child = subprocess.run([sys.executable, "-c", "from minqkv import kernels; print(kernels.get_backend())"],
                       env={**os.environ, "MINQKV_BACKEND": "numpy"}, capture_output=True, text=True)
print("a program started with MINQKV_BACKEND=numpy runs on:", child.stdout.strip())
assert child.stdout.strip() == "numpy"

# %% [markdown]
# **What you learned:** cffi lets Python hand NumPy's memory to C without copies; a GEMM is fast
# because of the order it visits memory in, not because of different arithmetic; softmax is
# computed after subtracting the row maximum; and every kernel has a NumPy twin you can switch to.

# %%
assert (out / "03_gemm_speed.png").exists()
print("lesson 3 done")
