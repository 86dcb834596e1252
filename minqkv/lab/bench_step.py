"""A training step of minqkv's GPT next to the same step in PyTorch, and long sequences.

    rows = run_step_bench(threads=(1, 2))   # --step: ms per step, tokens/s, peak memory, per side
    print(format_step_table(rows))
    print(format_long_table(run_long_bench()))   # --long: attention (full, windows, linear) and a step at
                                                 # T = 1k..8k, the study models' step and decoding at 8k

A step is forward, backward and an AdamW update of the same GPT: pre-LayerNorm blocks, one
fused attention per layer, a tanh-GELU MLP, tied output head, AdamW with betas (0.9, 0.95) and
weight decay 0.1 on the matrices. PyTorch's side is torch_gpt.py, the same GPT written with
torch.nn.functional.scaled_dot_product_attention (what nanoGPT uses); both sides start from the
same weights (minqkv's initialisation) and train on the same batch.

Each side runs in its own fresh process per thread count, so that its peak memory (getrusage's
maxrss, which sees C and PyTorch allocations, unlike tracemalloc) is its own and the two
libraries' thread pools never compete. The parent asks the processes of a shape, every side at
every thread count, in turn for `steps_per_round` timed steps, `rounds` times, so a burst of
load from elsewhere hits them all alike; a time is the median over all of a process's timed steps.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from .. import kernels
from ..kernels import runtime
from ..model import GPT, GPTConfig

STEP_SHAPES = {
    # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "nanogpt-cpu": (4, 4, 128, 64, 12),  # nanoGPT's shakespeare_char settings for a CPU
    # minqkv's GPTConfig defaults and train's batch size (TrainConfig.batch_size, written out: importing
    # train.py would add its modules' memory to each side's peak)
    "default": (GPTConfig.n_layer, GPTConfig.n_head, GPTConfig.n_embd, GPTConfig.block_size, 32),
}
VOCAB_SIZE = GPTConfig.vocab_size  # 65: the characters of Shakespeare
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)  # both sides' optimiser
# --long: attention of GPTConfig's heads (4 heads of 32, width 128), batch 1
LONG_SHAPE = (GPTConfig.n_head, GPTConfig.n_embd // GPTConfig.n_head)
LONG_LENGTHS = (1024, 2048, 4096, 8192)
# --long's other attention kinds, named as the label modifiers that choose them (modifiers.py), each
# timed beside the fused full causal attention at the same T in the same run
LONG_ATTENTION_KINDS = ("window256", "window64", "linear", "performer64")
# --long's training steps: (n_layer, n_head, n_embd) = (1, 4, 128), block T, batch 1
LONG_STEP_SHAPE = (1, GPTConfig.n_head, GPTConfig.n_embd)
STUDY_SHAPE = STEP_SHAPES["nanogpt-cpu"][:3]  # --long's study rows: nanoGPT's depth, so the pruned model fits
STUDY_MODELS = {  # name: GPTConfig overrides
    "abc": dict(code="abc"),  # canonical
    "abb": dict(code="abb"),  # K = V: half the KV cache
    "--a": dict(code="--a"),  # value-only
    "pruned": dict(layer_codes=["a-b", "--a", "--a", "--a"]),  # what the prune sweep chose at L=0.03
    "abc+window256": dict(code="abc", window=256),  # each query sees its last 256 keys
    "abc+linear": dict(code="abc", linear_features=0),  # linear attention, elu + 1: a state, no KV cache
}
STUDY_DECODE_TOKENS = 64  # tokens each study model decodes, after a prompt that fills the rest of the block


def _config(shape, seed, overrides=None):
    """minqkv's GPTConfig of a (n_layer, n_head, n_embd, block_size, batch_size) shape."""
    n_layer, n_head, n_embd, block_size, _ = shape
    return GPTConfig(vocab_size=VOCAB_SIZE, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     block_size=block_size, seed=seed, **(overrides or {}))


def _batch(shape, seed):
    """A fixed random batch of token ids (batch_size, block_size + 1): the inputs, and the targets one later."""
    _, _, _, block_size, batch_size = shape
    return np.random.default_rng(seed).integers(0, VOCAB_SIZE, (batch_size, block_size + 1))


def _step_minqkv(shape, seed, overrides=None):
    """A function that runs one training step of minqkv's GPT on a fixed random batch; overrides
    (e.g. code='abb' or layer_codes=[...]) change the variant."""
    from ..optim import AdamW

    model = GPT(_config(shape, seed, overrides))
    optimizer = AdamW(model.named_parameters(), **ADAMW)
    ids = _batch(shape, seed)

    def step():
        _, loss = model(ids[:, :-1], ids[:, 1:])
        model.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _step_torch(shape, seed):
    """The same step in PyTorch (torch_gpt.py): from minqkv's initial weights, on the same batch."""
    import torch

    from . import torch_gpt

    config = _config(shape, seed)
    weights = torch_gpt.weights_of(GPT(config))
    optimizer = torch_gpt.adamw(weights, **ADAMW)
    ids = torch.from_numpy(_batch(shape, seed))

    def step():
        loss = torch_gpt.loss(weights, config, ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_gflop(shape):
    """GFLOP of one training step: 3 x the forward's FLOPs (backward costs twice the forward), from
    GPT.flops_per_token, which counts attention over the whole block as nanoGPT's estimate_mfu
    does (the causal half is not subtracted), times the batch's tokens. AdamW's few FLOPs per
    parameter are left out."""
    tokens = shape[3] * shape[4]
    return 3 * GPT(_config(shape, seed=0)).flops_per_token() * tokens / 1e9


PEAK_GEMM_SIZE = 1024  # square float32 GEMM for the machine's peak: large enough for both libraries' best


def gemm_peak_gflops(size=PEAK_GEMM_SIZE, repeats=5):
    """(minqkv's GEMM, NumPy's) best GFLOP/s on a (size, size) @ (size, size) float32 product, on the
    thread counts this process was given (kernels.set_num_threads; OPENBLAS_NUM_THREADS for NumPy)."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    flop = 2.0 * size ** 3

    def best(call):
        call()  # warm up: thread pools started, pages touched
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        return flop / min(seconds) / 1e9

    return best(lambda: kernels.matmul(a, a)), best(lambda: a @ a)


def torch_available():
    """Whether PyTorch can be imported (checked in a child, so this process never loads it)."""
    done = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return done.returncode == 0


def _rss_now_mb():
    """This process's resident memory now (not its peak: _peak_rss_mb), in MiB (Linux), or 0 where
    /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def _peak_rss_mb():
    """train.peak_rss_mb (getrusage's maxrss), written again: importing train.py (tqdm, zipfile,
    subprocess, ...) would add about 8 MB to the very peak it measures."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _attention_settings(kind):
    """(window, linear_features) of a LONG_ATTENTION_KINDS kind: 'window256' -> (256, None),
    'linear' -> (None, 0), 'performer64' -> (None, 64), 'full' -> (None, None)."""
    from ..modifiers import parse

    settings = {} if kind == "full" else parse("abc+" + kind)
    return settings.get("window"), settings.get("linear_features")


def _attention_inputs(T, seed):
    """q, k, v and the output's gradient dy, each (1, n_head, T, head_dim) float32, from one seed."""
    rng = np.random.default_rng(seed)
    n_head, head_dim = LONG_SHAPE
    return [rng.standard_normal((1, n_head, T, head_dim)).astype(np.float32) for _ in range(4)]


def _performer_projection(m, seed):
    """The (head_dim, M) random features of performerM, the same on both sides."""
    from ..linear_attention import draw_performer_projection

    return draw_performer_projection(LONG_SHAPE[1], m, np.random.default_rng(seed), np.float32)


def _attention_minqkv(T, seed, kind="full"):
    """Forward and backward of one attention kind in minqkv, batch 1: the fused causal attention
    (ops.causal_attention, with its window for windowW), or for linear and performerM the feature
    maps and causal_linear_attention."""
    from .. import linear_attention, ops
    from ..tensor import Tensor

    window, features = _attention_settings(kind)
    *qkv, dy = _attention_inputs(T, seed)
    q, k, v = (Tensor(a, requires_grad=True) for a in qkv)
    projection = _performer_projection(features, seed) if features else None  # (head_dim, M)

    def phi(x):  # (1, H, T, head_dim) -> (1, H, T, M): elu + 1, or Performer's random features
        if features == 0:
            return linear_attention.elu_features(x)
        return linear_attention.performer_features(x, projection)

    def attend():
        if features is None:
            return ops.causal_attention(q, k, v, window=window)
        return linear_attention.causal_linear_attention(phi(q), phi(k), v)

    def step():
        for t in (q, k, v):
            t.grad = None
        attend().backward(dy)

    return step


def _attention_torch(T, seed, kind="full"):
    """The same in PyTorch: scaled_dot_product_attention(is_causal=True) for full, with a boolean band
    mask for windowW (O(T^2): PyTorch has no sliding-window kernel on the CPU), and for linear and
    performerM the same features with a plain torch.cumsum over the tokens (no fused linear attention
    in PyTorch), which holds S_t = sum phi(k_s) v_s^T for every t: O(T M head_dim) memory."""
    import torch
    import torch.nn.functional as F

    window, features = _attention_settings(kind)
    *qkv, dy = (torch.from_numpy(a) for a in _attention_inputs(T, seed))
    q, k, v = (a.requires_grad_() for a in qkv)
    if window is not None:
        distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # (T, T): query i - key j
        band = (distance >= 0) & (distance < window)  # True: attended
    projection = torch.from_numpy(_performer_projection(features, seed)) if features else None

    def phi(x):  # elu + 1, or exp(x' W - |x'|^2 / 2) / sqrt(M) with x' = x / head_dim^(1/4)
        if features == 0:
            return F.elu(x) + 1
        xs = x * LONG_SHAPE[1] ** -0.25
        return torch.exp(xs @ projection - 0.5 * (xs * xs).sum(-1, keepdim=True)) / features ** 0.5

    def attend():
        if features is None and window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if features is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=band)
        phi_q, phi_k = phi(q), phi(k)  # (1, H, T, M)
        state = torch.cumsum(phi_k[..., :, None] * v[..., None, :], dim=2)  # (1, H, T, M, hd)
        normaliser = torch.cumsum(phi_k, dim=2)  # (1, H, T, M)
        numerator = torch.einsum("bhtm,bhtmd->bhtd", phi_q, state)
        return numerator / ((phi_q * normaliser).sum(-1, keepdim=True) + 1e-6)

    def step():
        for t in (q, k, v):
            t.grad = None
        attend().backward(dy)

    return step


def _decode_minqkv(shape, seed, overrides, new_tokens):
    """A function that decodes one more token (greedy) with the KV cache, after a prompt that
    leaves room for new_tokens tokens in the block; the prompt is read (prefilled) here."""
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
    """The step function of a workload: a STEP_SHAPES name, 'attention-KIND-T' (a LONG_ATTENTION_KINDS
    kind at LONG_SHAPE), 'step-T' (a training step at LONG_STEP_SHAPE, block T), or 'study-NAME-T' and
    'decode-NAME-T' (a STUDY_MODELS model at STUDY_SHAPE, block T: a training step, a decoded token)."""
    kind, _, rest = workload.partition("-")
    if kind == "attention":
        name, _, T = rest.rpartition("-")
        return (_attention_torch if side == "torch" else _attention_minqkv)(int(T), seed, name)
    if kind == "step":
        shape = _long_shape(LONG_STEP_SHAPE, int(rest))
        return _step_torch(shape, seed) if side == "torch" else _step_minqkv(shape, seed)
    if kind in ("study", "decode"):
        name, _, T = rest.rpartition("-")
        shape = _long_shape(STUDY_SHAPE, int(T))
        if kind == "study":
            return _step_minqkv(shape, seed, STUDY_MODELS[name])
        return _decode_minqkv(shape, seed, STUDY_MODELS[name], STUDY_DECODE_TOKENS)
    return _step_torch(STEP_SHAPES[workload], seed) if side == "torch" else _step_minqkv(STEP_SHAPES[workload], seed)


def _long_shape(shape, T):
    """(n_layer, n_head, n_embd) of shape with block_size T and batch 1."""
    return shape[:3] + (T, 1)


def step_worker(side, workload, threads, warmup, seed=0):
    """The child process of one side: build, warm up, then answer `run N` lines on stdin with the
    N step times (JSON) and `quit` with its memory; see run_step_bench."""
    if side == "torch":
        import torch

        torch.set_num_threads(threads)
    else:
        kernels.set_num_threads(threads)
    step = _workload(side, workload, seed)
    rss_before = _rss_now_mb()
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
            memory = {"peak_mb": _peak_rss_mb(), "step_mb": _peak_rss_mb() - rss_before}
            if command[0] == "quit-with-peak":  # after the steps: the GEMMs' memory is not the step's
                memory["gemm_gflops"] = gemm_peak_gflops()
            print(json.dumps(memory), flush=True)
            return


class _Side:
    """A step_worker child process and the pipe to it."""

    def __init__(self, side, workload, threads, warmup):
        env = dict(os.environ, MINQKV_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   **runtime.wait_policy_for_children())
        code = (f"from minqkv.lab.bench_step import step_worker; "
                f"step_worker({side!r}, {workload!r}, {threads}, {warmup})")
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self._answer()  # ready

    def _answer(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark process {self.process.args[-1]!r} died "
                               f"(exit status {self.process.wait()}); its error is printed above")
        return json.loads(line)

    def ask(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def finish(self, with_peak=False):
        memory = self.ask("quit-with-peak" if with_peak else "quit")
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
                         batch_size * block_size, with_peak=True)
        _add_flop_rates(shape_rows, step_gflop(STEP_SHAPES[name]), sides)
    return rows


def _add_flop_rates(rows, gflop, sides):
    """Each side's GFLOP/s of the whole step, and minqkv's as a percentage of the row's GEMM peak
    (the better of minqkv's and NumPy's square GEMM, measured by the minqkv worker at its count)."""
    for row in rows:
        row["step_gflop"] = round(gflop, 3)
        for side in sides:
            row[f"{side}_gflops"] = round(gflop / row[f"{side}_ms"] * 1e3, 1)
        row["gemm_peak_gflops"] = max(row["minqkv_gemm_gflops"], row["numpy_gemm_gflops"])
        row["minqkv_percent_of_peak"] = round(100 * row["minqkv_gflops"] / row["gemm_peak_gflops"], 1)


def _measure(rows, workload, sides, threads, rounds, steps_per_round, warmup, tokens, with_peak=False):
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
                          {side: seconds[side, n] for side in sides}, tokens, with_peak)
    for side in sides:  # the speed-up from the first thread count's step to each row's
        for row in rows:
            row[f"{side}_speedup"] = round(rows[0][f"{side}_ms"] / row[f"{side}_ms"], 3)
    return rows


def _add_side_figures(row: dict, workers: dict, seconds: dict, tokens: int, with_peak: bool = False) -> None:
    """Add each side's median ms, tokens/s and memory (and minqkv/torch when both ran) to row;
    with_peak: also the GEMM peak measured by minqkv's worker."""
    for side in workers:
        memory = workers[side].finish(with_peak and side == "minqkv")
        if "gemm_gflops" in memory:
            row["minqkv_gemm_gflops"], row["numpy_gemm_gflops"] = (round(g, 1) for g in memory["gemm_gflops"])
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
    header += ["GFLOP/s", "GEMM peak", "% of peak"] + (["torch GFLOP/s"] if with_torch else [])
    lines = []
    for row in rows:
        sizes = f"({row['n_layer']},{row['n_head']},{row['n_embd']},{row['block_size']},{row['batch_size']})"
        cells = [row["shape"], sizes, str(row["threads"])]
        for side in ("minqkv", "torch") if with_torch else ("minqkv",):
            cells += [f"{row[f'{side}_ms']:.1f}", f"{row[f'{side}_tokens_per_s']:,}",
                      f"{row[f'{side}_speedup']:.2f}x", f"{row[f'{side}_peak_mb']:.0f}"]
        if with_torch:
            cells.append(f"{row['ratio']:.2f}x")
        cells += [f"{row['minqkv_gflops']:.1f}", f"{row['gemm_peak_gflops']:.0f}", f"{row['minqkv_percent_of_peak']:.0f}%"]
        cells += [f"{row['torch_gflops']:.1f}"] if with_torch else []
        lines.append(cells)
    footer = ("one step = forward + backward + AdamW; ms: median; speed-up: the side's ms at the shape's first "
              "thread count over this row's, timed in the same rounds; peak MB: the process's peak RSS; "
              "GFLOP/s: the step's FLOPs (3 x the forward's, attention over the whole block) per second; "
              f"GEMM peak: the better of minqkv's and NumPy's ({PEAK_GEMM_SIZE},{PEAK_GEMM_SIZE}) float32 GEMM "
              "at the row's thread count, same run; % of peak: minqkv's step GFLOP/s over it; "
              + ("ratio = minqkv ms / torch ms (below 1: minqkv faster)" if with_torch
                 else "PyTorch is not installed: minqkv's side only"))
    return "\n".join(_render(header, lines, left=2) + [footer])


def _render(header, lines, left=0):
    """An aligned text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]

    def render(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [render(header), "  ".join("-" * w for w in widths)] + [render(c) for c in lines]


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


# --long's default wall budget: one command on the 16-core host may run 10 minutes, and the
# checkout's build takes about one of them
LONG_BUDGET_S = 480.0


class _Budget:
    """The wall time left to run_long_bench: guesses whether the next row fits, from the time the
    same kind of row took at a shorter T (grown as T^2, full attention's cost, or as T for a kind
    whose cost is linear in T), and prints each row as it finishes (to stderr, flushed, so JSON on
    stdout stays clean)."""

    def __init__(self, seconds, log):
        self.seconds, self.log = seconds, log
        self.start = time.perf_counter()
        self.last = {}  # kind: (T, seconds) of its last row
        self.skipped = []

    def spent(self):
        return time.perf_counter() - self.start

    def fits(self, kind, T, what, power=2):
        """Whether a row of `kind` (e.g. 'attention', or ('study', threads)) at T should start; if
        not, it is noted as skipped. Its time is guessed to grow as T^power. A kind not seen yet is
        guessed from the slowest row of its family seen so far ('study' at another thread count:
        one thread is the slowest)."""
        family = kind[0] if isinstance(kind, tuple) else kind
        seen = [(t, sec) for key, (t, sec) in self.last.items() if key == kind
                or (isinstance(key, tuple) and key[0] == family)]
        if kind in self.last:
            last_T, last_seconds = self.last[kind]
            guess = last_seconds * (T / last_T) ** power
        elif seen:
            guess = max(sec * (T / t) ** power for t, sec in seen)
        else:
            guess = 0.0  # nothing to go on: run it
        if self.spent() + guess <= self.seconds:
            return True
        self.skipped.append(f"{what}: skipped, about {guess:.0f} s would not fit in the {self.seconds:.0f} s "
                            f"budget ({self.spent():.0f} s spent)")
        self._print(self.skipped[-1])
        return False

    def done(self, kind, T, started, text):
        self.last[kind] = (T, time.perf_counter() - started)
        self._print(f"{text}  [{self.spent():.0f} s of {self.seconds:.0f} s]")

    def _print(self, text):
        if self.log is not None:
            print(text, file=self.log, flush=True)


def _row_text(what, row):
    text = f"{what}: minqkv {row['minqkv_ms']:.1f} ms"
    return text + (f", torch {row['torch_ms']:.1f} ms, ratio {row['ratio']:.2f}x" if "ratio" in row else "")


def run_long_bench(lengths=LONG_LENGTHS, threads=(1,), rounds=3, steps_per_round=1, with_torch=None,
                   budget_s=LONG_BUDGET_S, log=sys.stderr, kinds=LONG_ATTENTION_KINDS):
    """Long sequences, batch 1, each workload in its own process per side; returns a dict of lists:

    attention  causal attention forward + backward (4 heads of 32): minqkv's fused kernel next to
               PyTorch's scaled_dot_product_attention, per (T, threads)
    attention_kinds
               the same for each of `kinds` (LONG_ATTENTION_KINDS: sliding windows, linear attention,
               Performer), per (T, threads), with the full attention's ms and memory of that T beside
               it (full_ms, full_step_mb; ms_vs_full = kind ms / full ms, minqkv on both) and a
               PyTorch reference (torch_reference says which: _attention_torch)
    step       a training step of a 1-layer GPT (LONG_STEP_SHAPE) with block T, minqkv next to the
               same GPT in PyTorch (SDPA), per (T, threads)
    study      at the longest T, per STUDY_MODELS model (4 layers): minqkv's training step, the KV
               cache's size and greedy decoding with it (STUDY_DECODE_TOKENS tokens after a prompt that
               fills the rest of the block), per threads
    and step_memory: per side, how the step's memory grew from the shortest T to the longest.
    Each row has ms, tokens/s and memory per side, and ratio = minqkv ms / torch ms.

    budget_s: wall seconds for the whole bench; a row whose guessed time would overrun it is
    skipped and listed under "skipped". log: where each row is printed as it finishes (None: quiet)."""
    if not lengths or min(lengths) <= STUDY_DECODE_TOKENS or rounds < 1 or steps_per_round < 1:
        raise ValueError(f"run_long_bench: lengths must be above STUDY_DECODE_TOKENS={STUDY_DECODE_TOKENS} "
                         f"and rounds and steps_per_round >= 1, got lengths={lengths}, {rounds}, {steps_per_round}")
    with_torch = torch_available() if with_torch is None else with_torch
    sides = ("minqkv", "torch") if with_torch else ("minqkv",)
    timing = dict(rounds=rounds, steps_per_round=steps_per_round, warmup=1)
    budget = _Budget(budget_s, log)

    def measure(key, T, what, workload, sizes, power=2):
        """One workload's rows at T, a row per thread count, or none when it does not fit the budget."""
        if not budget.fits(key, T, what, power):
            return []
        started = time.perf_counter()
        rows = _measure([{"T": T, "threads": n, **sizes} for n in threads], workload, sides, threads,
                        tokens=T, **timing)
        budget.done(key, T, started, "; ".join(_row_text(f"{what} threads={r['threads']}", r) for r in rows))
        return rows

    heads = {"n_head": LONG_SHAPE[0], "head_dim": LONG_SHAPE[1]}
    attention, attention_kinds, steps, study = [], [], [], []
    for T in sorted(lengths):
        full = measure("attention", T, f"attention T={T}", f"attention-full-{T}", heads)
        attention += full
        for kind in kinds:
            linear = _attention_settings(kind)[1] is not None  # a window's PyTorch reference is O(T^2)
            rows = measure(("attention", kind), T, f"attention {kind} T={T}", f"attention-{kind}-{T}",
                           {"kind": kind, **heads}, power=1 if linear else 2)
            attention_kinds += [_beside_full(row, full, with_torch) for row in rows]
        steps += measure("step", T, f"step T={T}", f"step-{T}",
                         {"n_layer": LONG_STEP_SHAPE[0], "n_embd": LONG_STEP_SHAPE[2]})
    T = max(lengths)
    for name in STUDY_MODELS:
        for n in threads:
            if budget.fits(("study", n), T, f"study {name} T={T} threads={n}"):
                started = time.perf_counter()
                study.append(_study_row(name, T, n, timing))
                budget.done(("study", n), T, started, f"study {name} T={T} threads={n}: step "
                            f"{study[-1]['minqkv_ms']:.0f} ms, decode {study[-1]['decode_ms_per_token']:.2f} ms/token")
    return {"attention": attention, "attention_kinds": attention_kinds, "step": steps, "study": study,
            "skipped": budget.skipped, "budget_s": budget_s, "spent_s": round(budget.spent(), 1),
            "step_memory": {side: _memory_growth(steps, side) for side in sides} if steps else {}}


def _torch_reference(kind):
    """What PyTorch's side of an attention kind runs (see _attention_torch)."""
    window, features = _attention_settings(kind)
    if window is not None:
        return "SDPA, band mask"
    return "SDPA, causal" if features is None else "cumsum"


def _beside_full(row, full_rows, with_torch):
    """An attention kind's row with the full attention's minqkv figures at its T and thread count
    (None where that row was skipped)."""
    full = next((f for f in full_rows if f["threads"] == row["threads"]), None)
    if full is None:
        row.update(full_ms=None, full_step_mb=None, ms_vs_full=None)
    else:
        row.update(full_ms=full["minqkv_ms"], full_step_mb=full["minqkv_step_mb"],
                   ms_vs_full=round(row["minqkv_ms"] / full["minqkv_ms"], 3))
    if with_torch:
        row["torch_reference"] = _torch_reference(row["kind"])
    return row


def _study_row(name, T, threads, timing):
    """minqkv's training step, KV cache size and decoding speed of one STUDY_MODELS model at block T."""
    config = _config(_long_shape(STUDY_SHAPE, T), 0, STUDY_MODELS[name])
    codes = [config.code_of(i) for i in range(config.n_layer)]
    floats = sum(config.attention_spec(i).decode_state_floats(T) for i in range(config.n_layer))  # a full block
    row = {"model": name, "T": T, "threads": threads, "codes": "/".join(codes),
           "kv_cache_mb": round(floats * np.dtype(config.dtype).itemsize / 2**20, 2)}
    _measure([row], f"study-{name}-{T}", ("minqkv",), (threads,), tokens=T, **timing)
    warmup = min(4, STUDY_DECODE_TOKENS - 1)
    per_round = (STUDY_DECODE_TOKENS - warmup) // timing["rounds"]
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


def _side_cells(row, with_torch, memory="step_mb"):
    cells = [f"{row['minqkv_ms']:.1f}", f"{row['minqkv_tokens_per_s']:,}", f"{row[f'minqkv_{memory}']:.1f}"]
    if with_torch:
        cells += [f"{row['torch_ms']:.1f}", f"{row['torch_tokens_per_s']:,}", f"{row[f'torch_{memory}']:.1f}",
                  f"{row['ratio']:.2f}x"]
    return cells


def format_long_table(result):
    """The result of run_long_bench as four text tables and the memory verdict."""
    with_torch = any("ratio" in row for row in result["attention"] + result.get("attention_kinds", []) + result["step"])
    sides = ["minqkv ms", "tok/s", "growth MB"] + (["torch ms", "tok/s", "growth MB", "ratio"] if with_torch else [])
    torch_note = ("ratio = minqkv ms / torch ms (below 1: minqkv faster)" if with_torch
                  else "PyTorch is not installed: minqkv's side only")
    out = ["causal attention forward + backward, batch 1, 4 heads of 32"]
    out += _render(["T", "threads"] + sides,
                   [[str(r["T"]), str(r["threads"])] + _side_cells(r, with_torch) for r in result["attention"]])
    out += _format_kinds(result.get("attention_kinds", []), with_torch)
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
                    f"decoding: {STUDY_DECODE_TOKENS} greedy tokens with the KV cache after a prompt of "
                    f"T - {STUDY_DECODE_TOKENS}"]
        out += _render(["model", "codes", "threads", "step ms", "tok/s", "peak MB", "KV cache/state MB",
                        "decode ms/token", "decode tok/s"],
                       [[r["model"], r["codes"], str(r["threads"]), f"{r['minqkv_ms']:.0f}",
                         f"{r['minqkv_tokens_per_s']:,}", f"{r['minqkv_peak_mb']:.0f}", f"{r['kv_cache_mb']:.1f}",
                         f"{r['decode_ms_per_token']:.2f}", f"{r['decode_tokens_per_s']:,}"] for r in study], left=2)
    skipped = result.get("skipped", [])
    out += ["", f"{len(skipped)} rows skipped to stay within the {result['budget_s']:.0f} s budget "
                f"({result['spent_s']:.0f} s spent):"] + skipped if skipped else []
    out += ["", "ms: median; growth MB: peak RSS during the timed steps minus RSS before them; peak MB: the "
                "process's peak RSS; KV cache/state MB: what the decoder keeps after a full block, in float32: "
                "the keys and values a query can still see (a window's last W), or linear attention's "
                "state; " + torch_note]
    return "\n".join(out)


def _format_kinds(rows, with_torch):
    """The attention kinds' table, each row beside the full attention of its T."""
    if not rows:
        return []
    head_count, head_dim = LONG_SHAPE
    header = ["T", "threads", "kind", "minqkv ms", "growth MB", "full ms", "full MB", "vs full"]
    header += ["torch reference", "torch ms", "growth MB", "ratio"] if with_torch else []
    lines = []
    for r in rows:
        full = (["-", "-", "-"] if r["full_ms"] is None else
                [f"{r['full_ms']:.1f}", f"{r['full_step_mb']:.1f}", f"{r['ms_vs_full']:.2f}x"])
        cells = [str(r["T"]), str(r["threads"]), r["kind"], f"{r['minqkv_ms']:.1f}", f"{r['minqkv_step_mb']:.1f}"]
        cells += full
        if with_torch:
            cells += [r["torch_reference"], f"{r['torch_ms']:.1f}", f"{r['torch_step_mb']:.1f}", f"{r['ratio']:.2f}x"]
        lines.append(cells)
    note = ("full: minqkv's fused causal attention at the same T, same run; vs full = kind ms / full ms (below 1: "
            "the kind is faster); windowW: the fused kernel skipping keys outside the window; linear, performerM: "
            "elu + 1 or M random features, then causal_linear_attention (chunked)")
    if with_torch:
        note += ("; torch reference: windowW is scaled_dot_product_attention with a boolean (T, T) band mask, "
                 "O(T^2) time and memory (PyTorch has no sliding-window kernel on the CPU); linear and "
                 "performerM have no fused op in PyTorch: the same features and a plain torch.cumsum of "
                 "phi(k) v^T over the tokens, O(T M hd) memory; ratio = minqkv ms / torch ms")
    return (["", f"attention kinds, forward + backward, batch 1, {head_count} heads of {head_dim}, beside full "
                 "causal attention"] + _render(header, lines, left=0) + [note])
