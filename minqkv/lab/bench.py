"""Speed of minqkv's kernels next to NumPy's, measured side by side in one run (`minqkv bench`;
a training step and long sequences next to PyTorch: bench_step.py).

    rows = run_bench(repeats=20)  # threads=(1, 2): the table at each thread count of the C kernels
    print(format_table(rows))

Each row times one kernel call through minqkv.kernels (the active backend, normally the C
core, validation and allocation included) and the NumPy a NumPy user would write, on the same
arrays: `a @ b` (OpenBLAS with all its threads) for products, and for softmax the stable formula
as kernels.softmax_numpy and kernels.softmax_backward_numpy write it (the NumPy twins). A time is
the median over `repeats` calls after `warmup` untimed ones; the two are measured alternately
`rounds` times and each keeps its best round, so that a burst of load from another process does
not decide the ratio. Throughput is in GFLOPS for products (2*M*N*K per matrix) and in GB/s for
softmax (bytes read plus written).
ratio = minqkv / reference: above 1, minqkv is faster.

Between the two measurements the process sleeps `settle` seconds: an idle thread pool (OpenBLAS
keeps spinning for about 0.1 s after a call, OpenMP for a few ms) would otherwise steal one of
the cores from the other library and make the comparison say more about the scheduler than
about the kernels.
"""

import statistics
import time

import numpy as np

from .. import kernels
from ..model import GPTConfig
from ..train import TrainConfig


def _median_seconds(call, repeats, warmup):
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compare(ours, reference, repeats, warmup, rounds, settle):
    """(our seconds, reference seconds) per call: the best of `rounds` alternating medians."""
    best_ours = best_reference = float("inf")
    for _ in range(rounds):
        best_reference = min(best_reference, _median_seconds(reference, repeats, warmup))
        time.sleep(settle)
        best_ours = min(best_ours, _median_seconds(ours, repeats, warmup))
        time.sleep(settle / 4)
    return best_ours, best_reference


def _matmul_cases():
    """(name, a shape, b shape, dtype, trans_a, trans_b): square GEMMs, then the products of
    minqkv's default char GPT (GPTConfig: C = 128 channels, 4 heads of 32, T = 128) on a batch of
    B*T = 4096 tokens, then with B*T = 768 tokens, T = 64 (nanoGPT's CPU shape)."""
    f32, f64 = np.float32, np.float64
    C, T, hd = GPTConfig.n_embd, GPTConfig.block_size, GPTConfig.n_embd // GPTConfig.n_head
    tokens = TrainConfig.batch_size * T  # train's batch: 32 sequences
    heads = 64  # (sequence, head) pairs of the attention products
    return [
        ("gemm square", (128, 128), (128, 128), f32, False, False),
        ("gemm square", (256, 256), (256, 256), f32, False, False),
        ("gemm square", (512, 512), (512, 512), f32, False, False),
        ("gemm square", (256, 256), (256, 256), f64, False, False),
        ("gpt qkv projection", (tokens, C), (C, 3 * C), f32, False, False),
        ("gpt mlp up", (tokens, C), (C, 4 * C), f32, False, False),
        ("gpt mlp down, grad input", (tokens, C), (4 * C, C), f32, False, True),
        ("gpt qkv, grad weight", (tokens, C), (tokens, 3 * C), f32, True, False),
        ("gpt attention scores", (heads, T, hd), (heads, hd, T), f32, False, False),
        ("gpt attention scores, q k^T", (heads, T, hd), (heads, T, hd), f32, False, True),
        ("gpt attention @ values", (heads, T, T), (heads, T, hd), f32, False, False),
        ("nanogpt qkv projection", (768, 128), (128, 384), f32, False, False),
        ("nanogpt out projection", (768, 128), (128, 128), f32, False, False),
        ("nanogpt mlp down", (768, 512), (512, 128), f32, False, False),
        ("nanogpt mlp up, grad weight", (768, 128), (768, 512), f32, True, False),
        ("nanogpt attention scores, q k^T", (48, 64, 32), (48, 64, 32), f32, False, True),
        ("nanogpt attention @ values", (48, 64, 64), (48, 64, 32), f32, False, False),
    ]


def _shape_text(a_shape, b_shape, trans_a, trans_b):
    return f"{a_shape}{'^T' if trans_a else ''} @ {b_shape}{'^T' if trans_b else ''}"


def _matmul_row(name, a_shape, b_shape, dtype, trans_a, trans_b, rng, timing):
    a = rng.standard_normal(a_shape).astype(dtype)
    b = rng.standard_normal(b_shape).astype(dtype)
    op_a = np.swapaxes(a, -1, -2) if trans_a else a
    op_b = np.swapaxes(b, -1, -2) if trans_b else b
    batch = a.shape[0] if a.ndim == 3 else 1
    (M, K), N = op_a.shape[-2:], op_b.shape[-1]
    flops = 2.0 * batch * M * N * K
    ours, reference = _compare(lambda: kernels.matmul(a, b, trans_a, trans_b), lambda: op_a @ op_b,
                               **timing)
    return _row(name, dtype, _shape_text(a_shape, b_shape, trans_a, trans_b),
                flops / ours / 1e9, flops / reference / 1e9, "GFLOPS", ours, reference)


def _softmax_rows(rng, timing):
    rows = []
    shape = (64, GPTConfig.block_size, GPTConfig.block_size)  # (B*H, T, T) attention scores of the char GPT
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal(shape).astype(dtype)
        moved = 2.0 * x.nbytes  # read x, write y
        for causal in (False, True):
            ours, reference = _compare(lambda: kernels.softmax(x, causal),
                                       lambda: kernels.softmax_numpy(x, causal), **timing)
            rows.append(_row("softmax causal" if causal else "softmax", dtype, str(shape),
                             moved / ours / 1e9, moved / reference / 1e9, "GB/s", ours, reference))
        y = kernels.softmax(x)
        dy = rng.standard_normal(shape).astype(dtype)
        moved = 3.0 * x.nbytes  # read y and dy, write dx
        ours, reference = _compare(lambda: kernels.softmax_backward(y, dy),
                                   lambda: kernels.softmax_backward_numpy(y, dy), **timing)
        rows.append(_row("softmax backward", dtype, str(shape),
                         moved / ours / 1e9, moved / reference / 1e9, "GB/s", ours, reference))
    return rows


def _row(name, dtype, shape, ours, reference, unit, ours_seconds, reference_seconds):
    return {
        "bench": name,
        "dtype": np.dtype(dtype).name,
        "shape": shape,
        "minqkv": float(f"{ours:.4g}"),  # significant digits: a stalled call still shows above 0
        "reference": float(f"{reference:.4g}"),
        "ratio": float(f"{ours / reference:.4g}"),
        "unit": unit,
        "minqkv_ms": round(ours_seconds * 1e3, 4),
        "reference_ms": round(reference_seconds * 1e3, 4),
        "backend": kernels.get_backend(),
        "threads": kernels.get_num_threads(),
    }


def run_bench(repeats=20, warmup=3, rounds=3, settle=0.15, seed=0, threads=None):
    """Time every kernel against NumPy; returns one dict per case with the keys bench, dtype,
    shape, minqkv, reference, ratio, unit, minqkv_ms, reference_ms, backend and threads
    (see the module docstring). Takes about 10 s with the defaults.

    threads: thread counts for minqkv's kernels, every case timed at each in turn (default: the
    current count). NumPy keeps its own threads.
    """
    if repeats < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"run_bench: repeats and rounds must be >= 1 and warmup >= 0, "
                         f"got repeats={repeats}, warmup={warmup}, rounds={rounds}")
    timing = dict(repeats=repeats, warmup=warmup, rounds=rounds, settle=settle)
    rows = []
    for count in threads or (kernels.get_num_threads(),):
        rows += _rows_at(count, seed, timing)
    return rows


def _rows_at(threads, seed, timing):
    """Every case with the kernels on `threads` threads; the count in use is restored after."""
    previous = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        rng = np.random.default_rng(seed)  # the same arrays at every count
        rows = [_matmul_row(*case, rng, timing) for case in _matmul_cases()]
        return rows + _softmax_rows(rng, timing)
    finally:
        kernels.set_num_threads(previous)


def format_table(rows):
    """The rows of run_bench as an aligned text table."""
    several = len({row.get("threads") for row in rows}) > 1  # then a column says which count
    header = ["bench", "dtype", "shape"] + ["threads"] * several + ["minqkv", "numpy", "unit", "ratio"]
    lines = [[row["bench"], row["dtype"], row["shape"]] + [row["threads"]] * several +
             [f"{row['minqkv']:.1f}", f"{row['reference']:.1f}", row["unit"], f"{row['ratio']:.2f}x"]
             for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    numeric = {i for i, name in enumerate(header) if name in ("threads", "minqkv", "numpy", "ratio")}

    def render(cells):
        return "  ".join(str(cell).rjust(width) if i in numeric else str(cell).ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * width for width in widths)
    backends = sorted({row.get("backend", "?") for row in rows})
    threads = sorted({str(row.get("threads", "?")) for row in rows})
    footer = (f"minqkv backend: {', '.join(backends)}, threads: {', '.join(threads)}; "
              "ratio = minqkv / numpy (above 1: minqkv faster)")
    return "\n".join([render(header), rule] + [render(cells) for cells in lines] + [footer])
