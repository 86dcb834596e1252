"""Speed of minqkv's kernels next to NumPy's, measured side by side in one run.

    rows = run_bench(repeats=20)  # threads=(1, 2): the table at each thread count of the C kernels
    print(format_table(rows))

Each row times one kernel call through minqkv.kernels (the active backend, normally the C
core, validation and allocation included) and the NumPy a NumPy user would write, on the same
arrays: `a @ b` (OpenBLAS with all its threads) for products, and for softmax the stable formula
as kernels.softmax_numpy and kernels.softmax_backward_numpy write it (the NumPy twins). A time is the median over `repeats` calls after `warmup` untimed ones; the two are
measured alternately `rounds` times and each keeps its best round, so that a burst of load
from another process does not decide the ratio. Throughput is
in GFLOPS for products (2*M*N*K per matrix) and in GB/s for softmax (bytes read plus written).
ratio = minqkv / reference: above 1, minqkv is faster.

Between the two measurements the process sleeps `settle` seconds: an idle thread pool (OpenBLAS
keeps spinning for about 0.1 s after a call, OpenMP for a few ms) would otherwise steal one of
the cores from the other library and make the comparison say more about the scheduler than
about the kernels.
"""

import os
import statistics
import time

import numpy as np

from .. import kernels


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
    """(name, a shape, b shape, dtype, trans_a, trans_b): square GEMMs, then a char-GPT's
    products with B*T = 4096 tokens, C = 128 channels, 4 heads of 32, T = 128 (the default model),
    then with B*T = 768 tokens, T = 64 (nanoGPT's CPU shape)."""
    f32, f64 = np.float32, np.float64
    return [
        ("gemm square", (128, 128), (128, 128), f32, False, False),
        ("gemm square", (256, 256), (256, 256), f32, False, False),
        ("gemm square", (512, 512), (512, 512), f32, False, False),
        ("gemm square", (256, 256), (256, 256), f64, False, False),
        ("gpt qkv projection", (4096, 128), (128, 384), f32, False, False),
        ("gpt mlp up", (4096, 128), (128, 512), f32, False, False),
        ("gpt mlp down, grad input", (4096, 128), (512, 128), f32, False, True),
        ("gpt qkv, grad weight", (4096, 128), (4096, 384), f32, True, False),
        ("gpt attention scores", (64, 128, 32), (64, 32, 128), f32, False, False),
        ("gpt attention scores, q k^T", (64, 128, 32), (64, 128, 32), f32, False, True),
        ("gpt attention @ values", (64, 128, 128), (64, 128, 32), f32, False, False),
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
    shape = (64, 128, 128)  # (B*H, T, T) attention scores of the char GPT
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


# ---- one training step, minqkv next to PyTorch -------------------------------------------------
#
# A step is forward, backward and an AdamW update of the same GPT: pre-LayerNorm blocks, one
# fused attention per layer, a tanh-GELU MLP, tied output head, AdamW with betas (0.9, 0.95) and
# weight decay 0.1 on the matrices. PyTorch's side is written below with
# torch.nn.functional.scaled_dot_product_attention (what nanoGPT uses).
#
# Each side runs in its own fresh process per thread count, so that its peak memory (getrusage's
# maxrss, which sees C and PyTorch allocations, unlike tracemalloc) is its own and the two
# libraries' thread pools never compete. The parent asks the processes of a shape, every side at
# every thread count, in turn for `steps_per_round` timed steps, `rounds` times, so a burst of
# load from elsewhere hits them all alike; a time is the median over all of a process's timed steps.

STEP_SHAPES = {
    # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "nanogpt-cpu": (4, 4, 128, 64, 12),  # nanoGPT's shakespeare_char settings for a CPU
    "default": (4, 4, 128, 128, 32),  # minqkv's GPTConfig defaults and train's batch size
}
VOCAB_SIZE = 65  # the characters of Shakespeare
LONG_SHAPE = (4, 32)  # --long: 4 heads of 32 (width 128), batch 1
LONG_LENGTHS = (1024, 2048, 4096, 8192)
LONG_STEP_SHAPE = (1, 4, 128)  # --long's training steps: (n_layer, n_head, n_embd), block T, batch 1
STUDY_SHAPE = (4, 4, 128)  # --long's study rows: nanoGPT's depth, so the pruned model fits
STUDY_MODELS = {  # name: GPTConfig overrides
    "abc": dict(code="abc"),  # canonical
    "abb": dict(code="abb"),  # K = V: half the KV cache
    "--a": dict(code="--a"),  # value-only
    "pruned": dict(layer_codes=["a-b", "--a", "--a", "--a"]),  # what the prune sweep chose at L=0.03
}
DECODE_TOKENS = 64  # tokens decoded after the prompt, per study model


def _config(shape, seed, overrides=None):
    """minqkv's GPTConfig of a (n_layer, n_head, n_embd, block_size, batch_size) shape."""
    from ..model import GPTConfig

    n_layer, n_head, n_embd, block_size, _ = shape
    return GPTConfig(vocab_size=VOCAB_SIZE, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     block_size=block_size, seed=seed, **(overrides or {}))


def _step_minqkv(shape, seed, overrides=None):
    """A function that runs one training step of minqkv's GPT on a fixed random batch; overrides
    (e.g. code='abb' or layer_codes=[...]) change the variant."""
    from ..model import GPT
    from ..optim import AdamW

    _, _, _, block_size, batch_size = shape
    model = GPT(_config(shape, seed, overrides))
    optimizer = AdamW(model.named_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB_SIZE, (batch_size, block_size + 1))

    def step():
        _, loss = model(ids[:, :-1], ids[:, 1:])
        model.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _step_torch(shape, seed):
    """The same step in PyTorch: the same GPT, written with scaled_dot_product_attention."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    n_layer, n_head, n_embd, block_size, batch_size = shape
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
            self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)  # one GEMM for Q, K and V
            self.out = nn.Linear(n_embd, n_embd, bias=False)
            self.fc, self.proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, H, T, hd)
                       for t in self.qkv(self.ln_1(x)).split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
            x = x + self.out(y.transpose(1, 2).reshape(B, T, C))
            return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = nn.Embedding(VOCAB_SIZE, n_embd)
            self.position_embedding = nn.Embedding(block_size, n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd)

        def forward(self, ids, targets):
            x = self.token_embedding(ids) + self.position_embedding(torch.arange(ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.token_embedding.weight.T  # tied head: (B, T, V)
            return F.cross_entropy(logits.view(-1, VOCAB_SIZE), targets.reshape(-1))

    model = GPT()
    decayed = [p for name, p in model.named_parameters() if p.dim() == 2 and "embedding" not in name]
    others = [p for name, p in model.named_parameters() if not (p.dim() == 2 and "embedding" not in name)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1},
                                   {"params": others, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95))
    ids = torch.randint(0, VOCAB_SIZE, (batch_size, block_size + 1))

    def step():
        loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def torch_available():
    """Whether PyTorch can be imported (checked in a child, so this process never loads it)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return done.returncode == 0


def _rss_mb():
    """This process's resident memory now, in MiB (Linux), or 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def _peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _attention_minqkv(T, seed):
    """Forward and backward of minqkv's fused causal attention (ops.causal_attention), batch 1."""
    from .. import ops
    from ..tensor import Tensor

    rng = np.random.default_rng(seed)
    n_head, head_dim = LONG_SHAPE
    q, k, v = (Tensor(rng.standard_normal((1, n_head, T, head_dim)).astype(np.float32), requires_grad=True)
               for _ in range(3))
    dy = rng.standard_normal((1, n_head, T, head_dim)).astype(np.float32)

    def step():
        for t in (q, k, v):
            t.grad = None
        ops.causal_attention(q, k, v).backward(dy)

    return step


def _attention_torch(T, seed):
    """The same in PyTorch: scaled_dot_product_attention(is_causal=True), forward and backward."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    n_head, head_dim = LONG_SHAPE
    q, k, v = (torch.randn(1, n_head, T, head_dim, requires_grad=True) for _ in range(3))
    dy = torch.randn(1, n_head, T, head_dim)

    def step():
        for t in (q, k, v):
            t.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dy)

    return step


def _decode_minqkv(shape, seed, overrides, new_tokens):
    """A function that decodes one more token (greedy) with the KV cache, after a prompt that
    leaves room for new_tokens tokens in the block; the prompt is read (prefilled) here."""
    from ..model import GPT
    from ..tensor import no_grad

    model = GPT(_config(shape, seed, overrides)).eval()
    block_size = shape[3]
    ids = np.random.default_rng(seed).integers(0, VOCAB_SIZE, (1, block_size - new_tokens))
    caches = model.new_caches()
    with no_grad():
        logits, _ = model(ids, caches=caches)
    state = {"next": logits.data[:, -1:].argmax(-1)}  # (1, 1)

    def step():
        with no_grad():
            logits, _ = model(state["next"], caches=caches)
        state["next"] = logits.data[:, -1:].argmax(-1)

    return step


def _workload(side, workload, seed):
    """The step function of a workload: a STEP_SHAPES name, 'attention-T', 'step-T' (a training
    step at LONG_STEP_SHAPE, block T), or 'study-NAME-T' and 'decode-NAME-T' (a STUDY_MODELS
    model at STUDY_SHAPE, block T: a training step, a decoded token)."""
    kind, _, rest = workload.partition("-")
    if kind == "attention":
        T = int(rest)
        return _attention_torch(T, seed) if side == "torch" else _attention_minqkv(T, seed)
    if kind == "step":
        shape = _long_shape(LONG_STEP_SHAPE, int(rest))
        return _step_torch(shape, seed) if side == "torch" else _step_minqkv(shape, seed)
    if kind in ("study", "decode"):
        name, _, T = rest.rpartition("-")
        shape = _long_shape(STUDY_SHAPE, int(T))
        if kind == "study":
            return _step_minqkv(shape, seed, STUDY_MODELS[name])
        return _decode_minqkv(shape, seed, STUDY_MODELS[name], DECODE_TOKENS)
    return _step_torch(STEP_SHAPES[workload], seed) if side == "torch" else _step_minqkv(STEP_SHAPES[workload], seed)


def _long_shape(shape, T):
    """(n_layer, n_head, n_embd) of shape with block_size T and batch 1."""
    return shape[:3] + (T, 1)


def step_worker(side, workload, threads, warmup, seed=0):
    """The child process of one side: build, warm up, then answer `run N` lines on stdin with the
    N step times (JSON) and `quit` with its memory; see run_step_bench."""
    import json
    import sys

    if side == "torch":
        import torch

        torch.set_num_threads(threads)
    else:
        kernels.set_num_threads(threads)
    step = _workload(side, workload, seed)
    rss_before = _rss_mb()
    for _ in range(warmup):
        step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            times = []
            for _ in range(int(command[1])):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            print(json.dumps({"seconds": times}), flush=True)
        else:
            print(json.dumps({"peak_mb": _peak_rss_mb(), "step_mb": _peak_rss_mb() - rss_before}),
                  flush=True)
            return


class _Side:
    """A step_worker child process and the pipe to it."""

    def __init__(self, side, workload, threads, warmup):
        import json
        import subprocess
        import sys

        self._json = json
        env = dict(os.environ, MINQKV_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        code = (f"from minqkv.lab.bench import step_worker; "
                f"step_worker({side!r}, {workload!r}, {threads}, {warmup})")
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self._answer()  # ready

    def _answer(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark process {self.process.args[-1]!r} died "
                               f"(exit status {self.process.wait()}); its error is printed above")
        return self._json.loads(line)

    def ask(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def finish(self):
        memory = self.ask("quit")
        self.process.wait()
        return memory


# Between two workers' turns: the OpenMP threads of the worker that just ran keep spinning for a
# while after its last step (libgomp's default), and would take a core from the next one's first
# steps.
SIDE_SETTLE_S = 0.2


def run_step_bench(threads=(1, 2), shapes=tuple(STEP_SHAPES), rounds=5, steps_per_round=4,
                   warmup=3, with_torch=None):
    """Time a training step of minqkv and (when installed) PyTorch, per shape and thread count.

    Returns one dict per (shape, threads) with ms per step, tokens per second and peak memory
    of each side, each side's speed-up (its step at the first thread count over its step at
    this one), and ratio = minqkv ms / PyTorch ms (below 1: minqkv is faster)."""
    if rounds < 1 or steps_per_round < 1 or warmup < 0:
        raise ValueError(f"run_step_bench: rounds and steps_per_round must be >= 1 and warmup >= 0, "
                         f"got {rounds}, {steps_per_round}, {warmup}")
    for name in shapes:
        if name not in STEP_SHAPES:
            raise ValueError(f"run_step_bench: unknown shape {name!r}; use one of {', '.join(STEP_SHAPES)}")
    with_torch = torch_available() if with_torch is None else with_torch
    sides = ("minqkv", "torch") if with_torch else ("minqkv",)
    rows = []
    for name in shapes:
        n_layer, n_head, n_embd, block_size, batch_size = STEP_SHAPES[name]
        shape_rows = [{"shape": name, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
                       "block_size": block_size, "batch_size": batch_size, "threads": n,
                       "backend": kernels.get_backend()} for n in threads]
        rows += _measure(shape_rows, name, sides, threads, rounds, steps_per_round, warmup,
                         batch_size * block_size)
    return rows


def _measure(rows, workload, sides, threads, rounds, steps_per_round, warmup, tokens):
    """rows (one per count in threads) with each side's figures for a workload.

    Every (side, thread count) runs in its own step_worker process, all of them alive at once,
    and each round asks them in turn: a burst of load from elsewhere hits every one alike, so
    both the minqkv / torch ratio and a side's speed-up from more threads compare times taken
    minutes apart no more than seconds apart."""
    workers = {(side, n): _Side(side, workload, n, warmup) for n in threads for side in sides}
    seconds = {key: [] for key in workers}
    for _ in range(rounds):
        for key, worker in workers.items():  # in turn: while one runs, the others wait on their pipes
            time.sleep(SIDE_SETTLE_S if len(workers) > 1 else 0)
            seconds[key] += worker.ask(f"run {steps_per_round}")["seconds"]
    for row, n in zip(rows, threads):
        _add_side_figures(row, {side: workers[side, n] for side in sides},
                          {side: seconds[side, n] for side in sides}, tokens)
    for side in sides:  # the speed-up from the first thread count's step to each row's
        for row in rows:
            row[f"{side}_speedup"] = round(rows[0][f"{side}_ms"] / row[f"{side}_ms"], 3)
    return rows


def _add_side_figures(row: dict, workers: dict, seconds: dict, tokens: int) -> None:
    """Add each side's median ms, tokens/s and memory (and minqkv/torch when both ran) to row."""
    for side in workers:
        memory = workers[side].finish()
        ms = statistics.median(seconds[side]) * 1e3
        row[f"{side}_ms"] = round(ms, 2)
        row[f"{side}_tokens_per_s"] = round(tokens / ms * 1e3)
        row[f"{side}_peak_mb"] = round(memory["peak_mb"], 1)
        row[f"{side}_step_mb"] = round(memory["step_mb"], 1)
    if "torch" in workers:
        row["ratio"] = round(row["minqkv_ms"] / row["torch_ms"], 3)


def format_step_table(rows):
    """The rows of run_step_bench as a text table, with a line saying how to read it."""
    with_torch = bool(rows) and "torch_ms" in rows[0]
    header = ["shape", "(L,H,C,T,B)", "threads", "minqkv ms", "tok/s", "speed-up", "peak MB"]
    if with_torch:
        header += ["torch ms", "tok/s", "speed-up", "peak MB", "ratio"]
    lines = []
    for row in rows:
        sizes = f"({row['n_layer']},{row['n_head']},{row['n_embd']},{row['block_size']},{row['batch_size']})"
        cells = [row["shape"], sizes, str(row["threads"])]
        for side in ("minqkv", "torch") if with_torch else ("minqkv",):
            cells += [f"{row[f'{side}_ms']:.1f}", f"{row[f'{side}_tokens_per_s']:,}",
                      f"{row[f'{side}_speedup']:.2f}x", f"{row[f'{side}_peak_mb']:.0f}"]
        if with_torch:
            cells.append(f"{row['ratio']:.2f}x")
        lines.append(cells)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]

    def render(cells):
        return "  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    footer = ("one step = forward + backward + AdamW; ms: median; speed-up: the side's ms at the shape's first "
              "thread count over this row's, timed in the same rounds; peak MB: the process's peak RSS; "
              + ("ratio = minqkv ms / torch ms (below 1: minqkv faster)" if with_torch
                 else "PyTorch is not installed: minqkv's side only"))
    return "\n".join([render(header), "  ".join("-" * w for w in widths)]
                     + [render(cells) for cells in lines] + [footer])


def profile_step(shape_name="nanogpt-cpu", steps=10, top=25):
    """cProfile of minqkv's training step: the `top` functions by own time, as text."""
    import cProfile
    import io
    import pstats

    step = _step_minqkv(STEP_SHAPES[shape_name], seed=0)
    step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def run_long_bench(lengths=LONG_LENGTHS, threads=(1,), rounds=3, steps_per_round=1, with_torch=None):
    """Long sequences, batch 1, each workload in its own process per side; returns a dict of lists:

    attention  causal attention forward + backward (4 heads of 32): minqkv's fused kernel next to
               PyTorch's scaled_dot_product_attention, per (T, threads)
    step       a training step of a 1-layer GPT (LONG_STEP_SHAPE) with block T, minqkv next to the
               same GPT in PyTorch (SDPA), per (T, threads)
    study      at the longest T, per STUDY_MODELS model (4 layers): minqkv's training step, the KV
               cache's size and greedy decoding with it (DECODE_TOKENS tokens after a prompt that
               fills the rest of the block), per threads
    and step_memory: per side, how the step's memory grew from the shortest T to the longest.
    Each row has ms, tokens/s and memory per side, and ratio = minqkv ms / torch ms."""
    if not lengths or min(lengths) <= DECODE_TOKENS or rounds < 1 or steps_per_round < 1:
        raise ValueError(f"run_long_bench: lengths must be above DECODE_TOKENS={DECODE_TOKENS} and rounds and "
                         f"steps_per_round >= 1, got lengths={lengths}, {rounds}, {steps_per_round}")
    with_torch = torch_available() if with_torch is None else with_torch
    sides = ("minqkv", "torch") if with_torch else ("minqkv",)
    timing = dict(rounds=rounds, steps_per_round=steps_per_round, warmup=1)
    attention, steps, study = [], [], []
    for T in lengths:
        rows = [{"T": T, "threads": n, "n_head": LONG_SHAPE[0], "head_dim": LONG_SHAPE[1]} for n in threads]
        attention += _measure(rows, f"attention-{T}", sides, threads, tokens=T, **timing)
        rows = [{"T": T, "threads": n, "n_layer": LONG_STEP_SHAPE[0], "n_embd": LONG_STEP_SHAPE[2]} for n in threads]
        steps += _measure(rows, f"step-{T}", sides, threads, tokens=T, **timing)
    T = max(lengths)
    for name in STUDY_MODELS:
        for n in threads:
            study.append(_study_row(name, T, n, timing))
    return {"attention": attention, "step": steps, "study": study,
            "step_memory": {side: _memory_growth(steps, side) for side in sides}}


def _study_row(name, T, threads, timing):
    """minqkv's training step, KV cache size and decoding speed of one STUDY_MODELS model at block T."""
    config = _config(_long_shape(STUDY_SHAPE, T), 0, STUDY_MODELS[name])
    codes = [config.code_of(i) for i in range(config.n_layer)]
    floats = sum(config.attention_spec(i).kv_cache_floats_per_token() for i in range(config.n_layer))
    row = {"model": name, "T": T, "threads": threads, "codes": "/".join(codes),
           "kv_cache_mb": round(floats * T * np.dtype(config.dtype).itemsize / 2**20, 2)}  # a full block
    _measure([row], f"study-{name}-{T}", ("minqkv",), (threads,), tokens=T, **timing)
    warmup = min(4, DECODE_TOKENS - 1)
    per_round = (DECODE_TOKENS - warmup) // timing["rounds"]
    [decode] = _measure([{}], f"decode-{name}-{T}", ("minqkv",), (threads,), timing["rounds"], per_round, warmup,
                        tokens=1)
    row["decode_ms_per_token"] = decode["minqkv_ms"]
    row["decode_tokens_per_s"] = decode["minqkv_tokens_per_s"]
    return row


def _memory_growth(rows, side):
    """How one side's step memory grew from the shortest T to the longest: linear when it grew by at
    most 1.5 x the ratio of lengths (a T^2 term would make it grow by the square of that ratio)."""
    first, last = min(rows, key=lambda r: r["T"]), max(rows, key=lambda r: r["T"])
    lengths = last["T"] / first["T"]
    start, end = first[f"{side}_step_mb"], last[f"{side}_step_mb"]
    growth = end / start if start > 0 else None
    return {"from_T": first["T"], "to_T": last["T"], "from_mb": start, "to_mb": end,
            "growth": None if growth is None else round(growth, 2), "length_ratio": lengths,
            "linear": None if growth is None else growth <= 1.5 * lengths}


def _render(header, lines, left=0):
    """An aligned text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]

    def render(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [render(header), "  ".join("-" * w for w in widths)] + [render(c) for c in lines]


def _side_cells(row, with_torch, memory="step_mb"):
    cells = [f"{row['minqkv_ms']:.1f}", f"{row['minqkv_tokens_per_s']:,}", f"{row[f'minqkv_{memory}']:.1f}"]
    if with_torch:
        cells += [f"{row['torch_ms']:.1f}", f"{row['torch_tokens_per_s']:,}", f"{row[f'torch_{memory}']:.1f}",
                  f"{row['ratio']:.2f}x"]
    return cells


def format_long_table(result):
    """The result of run_long_bench as three text tables and the memory verdict."""
    with_torch = "torch" in result["step_memory"]
    sides = ["minqkv ms", "tok/s", "growth MB"] + (["torch ms", "tok/s", "growth MB", "ratio"] if with_torch else [])
    torch_note = ("ratio = minqkv ms / torch ms (below 1: minqkv faster)" if with_torch
                  else "PyTorch is not installed: minqkv's side only")
    out = ["causal attention forward + backward, batch 1, 4 heads of 32"]
    out += _render(["T", "threads"] + sides,
                   [[str(r["T"]), str(r["threads"])] + _side_cells(r, with_torch) for r in result["attention"]])
    layers, _, width = LONG_STEP_SHAPE
    out += ["", f"training step (forward, backward, AdamW), {layers}-layer GPT, width {width}, 4 heads, "
                f"block T, batch 1"]
    out += _render(["T", "threads"] + sides,
                   [[str(r["T"]), str(r["threads"])] + _side_cells(r, with_torch) for r in result["step"]])
    for side, g in result["step_memory"].items():
        verdict = ("not measurable (no growth at the shortest T)" if g["linear"] is None else
                   f"{g['growth']:.1f}x for {g['length_ratio']:.0f}x the tokens: "
                   + ("linear" if g["linear"] else "MORE than linear"))
        out.append(f"{side} step memory T={g['from_T']}..{g['to_T']}: {g['from_mb']:.1f} -> {g['to_mb']:.1f} MB, "
                   + verdict)
    study = result["study"]
    if study:
        out += ["", f"the study at T={study[0]['T']}: {STUDY_SHAPE[0]} layers, width {STUDY_SHAPE[2]}, minqkv; "
                    f"decoding: {DECODE_TOKENS} greedy tokens with the KV cache after a prompt of "
                    f"T - {DECODE_TOKENS}"]
        out += _render(["model", "codes", "threads", "step ms", "tok/s", "peak MB", "KV cache MB",
                        "decode ms/token", "decode tok/s"],
                       [[r["model"], r["codes"], str(r["threads"]), f"{r['minqkv_ms']:.0f}",
                         f"{r['minqkv_tokens_per_s']:,}", f"{r['minqkv_peak_mb']:.0f}", f"{r['kv_cache_mb']:.1f}",
                         f"{r['decode_ms_per_token']:.2f}", f"{r['decode_tokens_per_s']:,}"] for r in study], left=2)
    out += ["", "ms: median; growth MB: peak RSS during the timed steps minus RSS before them; peak MB: the "
                "process's peak RSS; KV cache MB: float32 keys and values of a full block; " + torch_note]
    return "\n".join(out)
