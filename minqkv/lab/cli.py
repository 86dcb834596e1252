"""The `minqkv` command: train, sample, variants, gradcheck, bench, ablate, analyze.

Each subcommand is a small function that parses its flags into the package's own configs
and calls the package; nothing here computes anything itself.

Whatever goes wrong is one line on stderr, never a traceback: an error the user can act on
(bad settings, damaged files, a full disk or read-only folder, a busy run folder) exits with 2;
Ctrl-C exits with 130 and SIGTERM with 143, and a stopped `train` says how to resume it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import threading

import numpy as np

from .. import __version__, atomic
from ..modifiers import flag_rows, listing
from .exercises.command import add_exercise_parser

SAMPLE_PROMPT = "ROMEO:\n"


def main(argv=None) -> int:
    try:
        parser = build_parser()  # imports the package, which checks MINQKV_NUM_THREADS and MINQKV_BACKEND
    except ValueError as e:
        print(f"minqkv: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        with _stoppable():
            return args.run(args) or 0
    except KeyboardInterrupt as stop:
        print(f"minqkv {args.command}: {_stopped(args, stop)}", file=sys.stderr)
        # a sweep wraps the signal it stopped for in its own interrupt (see ablate.SweepInterrupted)
        terminated = isinstance(stop, Terminated) or isinstance(stop.__cause__, Terminated)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as e:
        print(f"minqkv {args.command}: error: {_error_text(e)}", file=sys.stderr)
        return 2


def _error_text(error: Exception) -> str:
    """An error's message; a system error's as 'PATH: what the system said'."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        paths = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else error.filename
        return f"{paths}: {error.strerror}"
    return str(error)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt, so that a run stops the same clean way."""


def _raise_stop(signum, frame):
    """Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated, except during a write (a
    checkpoint save) and inside a finalizer (`__del__`). A write's cleanup can replace the
    exception with its own error, and Python prints and drops one raised in a finalizer: the run
    would fail or go on instead of stopping. A write holds the signal until it ends; in a
    finalizer it is sent again a moment later, once the finalizer is done."""
    if atomic.writing():
        atomic.stop_later(signum)
        return
    if _inside_a_finalizer(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _inside_a_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _stoppable():
    """SIGTERM raises Terminated and Ctrl-C KeyboardInterrupt (unless the shell ignored it), both
    safe to receive inside a finalizer; SIGXFSZ is ignored so that a write past the file-size limit
    (ulimit -f) fails with OSError EFBIG instead of killing the process. Handlers are restored
    afterwards; only the main thread may set them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stop),
                signal.SIGXFSZ: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to restore
                signal.signal(number, handler)


def _stopped(args, stop: KeyboardInterrupt) -> str:
    """What a stopped command says (its own message, if the command gave one); a run also says
    what it kept and how to go on."""
    from ..checkpoint import checkpoint_path

    what = str(stop) or ("stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted")
    if args.command != "train":
        return what
    if not checkpoint_path(args.out).exists():
        return f"{what} before its first checkpoint; nothing to resume"
    out = shlex.quote(args.out)
    return f"{what}; its last checkpoint in {args.out} is kept: continue it with `minqkv train --out {out} --resume`"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minqkv", description="Does a Transformer need three "
                                     "projections? Train and compare attention variants on a CPU.")
    parser.add_argument("--version", action="version", version=f"minqkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_sample(sub)
    _add_variants(sub)
    _add_gradcheck(sub)
    _add_bench(sub)
    _add_ablate(sub)
    _add_analyze(sub)
    add_exercise_parser(sub, HelpFormatter)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each flag's default (when it has one) and keeps the epilog's lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if action.option_strings and shown and "default:" not in text:
            text += " (default: %(default)s)"
        return text


MODIFIERS_EPILOG = "modifiers (after a code, joined by '+', as in abb+rotate+gqa2):\n" + listing()
LIST_MODIFIERS = "list"  # `variants --modifiers` with no value


def _add_run_folder(p) -> None:
    """The folder of a training run: --out, as `train` names it (--ckpt is the same flag)."""
    p.add_argument("--out", "--ckpt", dest="out", required=True, help="the --out folder of a training run")


# ---- numbers that flags accept (argparse turns a ValueError into a usage error, exit code 2)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):  # float() reads 'inf' and 'nan' too
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


# ---- train -------------------------------------------------------------------------------


# Every flag that sets a run's configuration, in one list: (flag, field, type, help). The flag sets
# that field of GPTConfig or TrainConfig, or of both (seed); a --no-X switch sets its field to False.
# Defaults are None, so a resumed run knows which flags were actually given.
RUN_FLAGS = [
    ("--variant", "code", str, "a code such as abb, a name such as shared-kv, or either with "
                               "modifiers, e.g. abb+rotate+gqa2 (codes starting with '-' need "
                               "the = form: --variant=-ab)"),
    ("--data", "data", str, "shakespeare | PATH to a UTF-8 text | synthetic:TASK"),
    ("--steps", "steps", int, "training steps; with --resume, extends the run to this many"),
    ("--seed", "seed", int, "seed of the weights, the batches and dropout"),
    ("--n-layer", "n_layer", int, "transformer blocks"),
    ("--n-head", "n_head", int, "query heads per block"),
    ("--n-embd", "n_embd", int, "width of the model"),
    ("--block-size", "block_size", int, "context length"),
    ("--dropout", "dropout", float, "dropout probability on attention weights and residual branches"),
    ("--dtype", "dtype", str, "float32 | float64"),
    ("--batch-size", "batch_size", int, "sequences per step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr", "min_lr", float, "learning rate at the end of the cosine decay"),
    ("--warmup-steps", "warmup_steps", int, "steps of linear warm-up before the cosine decay"),
    ("--weight-decay", "weight_decay", float, "AdamW's decoupled weight decay (matrices only)"),
    ("--grad-clip", "grad_clip", float, "largest global gradient norm; larger ones are scaled down"),
    ("--eval-interval", "eval_interval", int, "evaluate and save a checkpoint every this many steps"),
    ("--eval-iters", "eval_iters", int, "validation batches per evaluation"),
    ("--beta1", "beta1", float, "AdamW's decay rate of the gradient's running mean"),
    ("--beta2", "beta2", float, "AdamW's decay rate of the squared gradient's running mean"),
    ("--gate-penalty", "gate_penalty", float, "gated models: weight L of the expected number of open gates "
                                              "in the objective (larger L shuts more projections)"),
    ("--gate-lr", "gate_lr", float, "gated models: peak learning rate of the gates (same schedule, no decay)"),
    ("--prune-threshold", "prune_threshold", float, "gated models: a deterministic gate at or below this "
                                                    "becomes the identity (0: only shut gates)"),
    *flag_rows(),  # the modifiers of a label, as flags: --rotate, --pos rope, --n-kv-head 2, ...
    ("--no-tie", "tie_weights", bool, "separate output head (no weight tying)"),
]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a char GPT with one attention variant",
                       description="Train a character-level GPT. With no arguments: the canonical "
                       "variant on Shakespeare, then a sample.", formatter_class=HelpFormatter,
                       epilog=MODIFIERS_EPILOG)
    p.add_argument("--out", default="out", help="folder for checkpoint and metrics")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out (other flags must match it; --steps may extend it)")
    for flag, field, kind, help_text in RUN_FLAGS:
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            default = getattr(_configs_with(field)[0](), field)
            if default is not None:
                help_text = f"{help_text} (default: {default})"
            p.add_argument(flag, type=kind, default=None, help=help_text)
    p.add_argument("--sample-tokens", type=non_negative_int, default=300,
                   help="characters to sample at the end (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)


def _configs_with(field: str) -> list:
    from ..model import GPTConfig
    from ..train import TrainConfig

    return [c for c in (GPTConfig, TrainConfig) if field in c.__dataclass_fields__]


def _given_settings(args, config) -> dict:
    """{field: value} of `config` for the run flags the user gave."""
    settings = {}
    for flag, field, _, _ in RUN_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))  # argparse's name: --n-layer -> n_layer
        if value is not None and config in _configs_with(field):
            settings[field] = not value if flag.startswith("--no-") else value
    if "code" in settings:
        settings.update(_variant_settings(settings.pop("code"), settings))
    return settings


def _variant_settings(label: str, flags: dict) -> dict:
    """--variant 'abb+rotate+gqa2' -> {code: 'abb', rotate: True, n_kv_head: 2}; a modifier flag
    given as well must agree with the label."""
    from ..model import GPTConfig

    settings = GPTConfig.overrides_from_label(label)
    clashes = [f"{field}={flags[field]!r}" for field in settings if field in flags and flags[field] != settings[field]]
    if clashes:
        raise ValueError(f"--variant {label} disagrees with the flags {', '.join(clashes)}: give each setting once")
    return settings


def cmd_train(args) -> int:
    from ..model import GPTConfig
    from ..train import TrainConfig, resume_training, train

    model_settings, train_settings = _given_settings(args, GPTConfig), _given_settings(args, TrainConfig)
    if args.resume:
        final = resume_training(args.out, model_settings, train_settings, progress=not args.quiet)
    else:
        final = train(GPTConfig(**model_settings), TrainConfig(**train_settings, out=args.out),
                      progress=not args.quiet)
    print(_result_lines(final))
    out = shlex.quote(args.out)
    print(f"saved in {args.out}: sample with `minqkv sample --out {out}`, inspect with `minqkv analyze --out {out}`")
    if args.sample_tokens > 0 and "val_bpc" in final:
        print(f"\n--- sample ({args.sample_tokens} characters, temperature 0.8) ---")
        print(_sample_text(args.out, SAMPLE_PROMPT, args.sample_tokens, 0.8, None, final["seed"]))
    return 0


def _result_lines(final: dict) -> str:
    metric = (f"val bpc {final['val_bpc']:.3f}" if "val_bpc" in final
              else f"accuracy {100 * final['accuracy']:.1f}%")
    # None: a resumed run with no step left to time, whose earlier final.json is gone
    speed = f"{final['tokens_per_s']:,.0f} tokens/s" if final["tokens_per_s"] is not None else "speed not measured"
    lines = [f"{final['variant']}: val loss {final['val_loss']:.4f}, {metric}, "
             f"{final['params']:,} params, {speed}, {final['wall_s']:.0f} s"]
    if "pruned_codes" in final:
        lines.append(f"pruned to per-layer codes {final['pruned_codes']} ({final['projections_kept']} of "
                     f"{final['projections_total']} projection matrices kept): val loss "
                     f"{final['val_loss_before_pruning']:.4f} -> {final['val_loss_after_pruning']:.4f}")
    return "\n".join(lines)


# ---- sample ------------------------------------------------------------------------------


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained checkpoint")
    _add_run_folder(p)
    p.add_argument("--prompt", default=SAMPLE_PROMPT,
                   help="text the sample continues; for a checkpoint of token ids (synthetic:mqar), "
                        "ids separated by spaces, e.g. '12 4097 3'")
    p.add_argument("--sample-tokens", "--tokens", dest="sample_tokens", type=non_negative_int, default=300,
                   help="characters (or tokens) to generate")
    p.add_argument("--temperature", type=positive_float, default=0.8,
                   help="divides the logits: below 1 sharper, above 1 more random")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample only among the k most likely characters (default: all)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampling")
    p.set_defaults(run=cmd_sample)


def cmd_sample(args) -> int:
    print(_sample_text(args.out, args.prompt, args.sample_tokens, args.temperature, args.top_k, args.seed))
    return 0


def _sample_text(ckpt, prompt, tokens, temperature, top_k, seed) -> str:
    from ..checkpoint import load_model
    from ..data import IdTokenizer

    model, tokenizer, _ = load_model(ckpt)
    if not prompt:
        raise ValueError("--prompt must not be empty")
    if isinstance(tokenizer, IdTokenizer):
        ids = _prompt_token_ids(tokenizer, prompt)  # (1, T)
    else:
        if prompt == SAMPLE_PROMPT and not set(prompt) <= set(tokenizer.chars):
            prompt = tokenizer.chars[0]  # the default prompt needs characters this corpus lacks
        ids = _prompt_ids(tokenizer, prompt)  # (1, T)
    out = model.generate(ids, tokens, temperature, top_k, np.random.default_rng(seed))
    return tokenizer.decode(out[0])


def _prompt_token_ids(tokenizer, prompt: str) -> np.ndarray:
    """--prompt '12 4097 3' as ids of shape (1, T) for a checkpoint whose tokens are ids (IdTokenizer)."""
    example = f"e.g. --prompt '1 {tokenizer.vocab_size // 2} 1'"
    if prompt == SAMPLE_PROMPT:
        raise ValueError(f"this checkpoint reads token ids, not text (its data was synthetic:mqar): give "
                         f"--prompt as ids in [0, {tokenizer.vocab_size}) separated by spaces, {example}")
    try:
        ids = tokenizer.encode(prompt)  # (T,)
    except ValueError as error:
        raise ValueError(f"--prompt: {error}; this checkpoint reads token ids in [0, {tokenizer.vocab_size}), "
                         f"{example}") from None
    if ids.size == 0:
        raise ValueError(f"--prompt holds no token ids: {example}")
    return ids[None, :]


def _prompt_ids(tokenizer, prompt: str) -> np.ndarray:
    """--prompt as ids of shape (1, T), or an error naming what the checkpoint cannot read."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # argv bytes that are not UTF-8 arrive as lone surrogates
        code = ord(prompt[error.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ValueError(f"--prompt is not UTF-8 text: {what} at character {error.start} cannot be "
                         "decoded; give the prompt in UTF-8") from None
    unknown = sorted(set(prompt) - set(tokenizer.chars))
    if unknown:
        shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ValueError(f"--prompt has characters outside the checkpoint's vocabulary of {tokenizer.vocab_size}: "
                         f"{shown}; use characters of the text it was trained on")
    return tokenizer.encode(prompt)[None, :]


# ---- variants ----------------------------------------------------------------------------


def _add_variants(sub) -> None:
    from .variants import MODEL_PRESETS

    from ..model import GPTConfig

    default = GPTConfig()
    p = sub.add_parser("variants", help="parameters, FLOPs and KV cache of every variant",
                       formatter_class=HelpFormatter, epilog=MODIFIERS_EPILOG)
    p.add_argument("--n-embd", type=positive_int, default=default.n_embd, help="width of the model")
    p.add_argument("--n-head", type=positive_int, default=default.n_head, help="query heads")
    p.add_argument("--n-kv-head", type=positive_int, default=None,
                   help="key/value heads (grouped-query attention; 1: multi-query; default: --n-head)")
    p.add_argument("--block-size", type=positive_int, default=default.block_size, help="context length for FLOPs")
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=None,
                   help="sizes of a known model (overrides --n-embd, --n-head, --block-size)")
    p.add_argument("--modifiers", nargs="?", const=LIST_MODIFIERS, default=None,
                   help="modifiers for every code, written as in a label, e.g. rope+out-gate (codes that "
                        "cannot take them say why); alone: list the modifiers")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(run=cmd_variants)


def cmd_variants(args) -> int:
    from .variants import format_rows, preset_rows, variant_rows

    if args.modifiers == LIST_MODIFIERS:
        print(listing())
        return 0
    modifiers = _modifier_settings(args.modifiers, args.n_kv_head)
    if args.preset:
        rows = preset_rows(args.preset, **modifiers)
    else:
        rows = variant_rows(n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size, **modifiers)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


def _modifier_settings(modifiers, n_kv_head) -> dict:
    """--modifiers 'rope+out-gate' and --n-kv-head -> GPTConfig fields besides the code."""
    from ..model import GPTConfig

    settings = GPTConfig.overrides_from_label("abc+" + modifiers) if modifiers else {}
    settings.pop("code", None)
    if n_kv_head is not None and settings.setdefault("n_kv_head", n_kv_head) != n_kv_head:
        raise ValueError(f"--modifiers {modifiers} disagrees with --n-kv-head {n_kv_head}: give it once")
    return settings


# ---- gradcheck ---------------------------------------------------------------------------


def _add_gradcheck(sub) -> None:
    p = sub.add_parser("gradcheck", help="float64 finite-difference check of every op or variant")
    p.add_argument("--variant", default=None, help="check a tiny GPT with this variant, or 'all'")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=cmd_gradcheck)


def cmd_gradcheck(args) -> int:
    from .gradcheck import format_table

    if args.variant is None:
        from .op_checks import run_op_checks
        results = run_op_checks()
    else:
        from .variant_checks import run_variant_checks
        results = run_variant_checks(args.variant)
    print(json.dumps([r.as_dict() for r in results], indent=2) if args.json else format_table(results))
    return 0 if all(r.passed for r in results) else 1


# ---- bench -------------------------------------------------------------------------------


def _add_bench(sub) -> None:
    from .bench_step import LONG_BUDGET_S

    p = sub.add_parser("bench", help="GFLOPS of the C core next to NumPy/OpenBLAS; --step: a training "
                                     "step next to PyTorch")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--step", action="store_true",
                   help="time one training step (forward, backward, AdamW) of minqkv and PyTorch")
    p.add_argument("--threads", type=_thread_list, default=None,
                   help="thread counts, comma-separated (default: the current count for the kernel table, "
                        "1,2 for --step, 1 for --long)")
    p.add_argument("--rounds", type=int, default=5, help="--step: alternating rounds per side")
    p.add_argument("--long", action="store_true",
                   help="attention forward + backward and a training step at T = 1k..8k (batch 1) next to "
                        "PyTorch's SDPA, sliding-window, linear and Performer attention beside the full one; "
                        "the study models (canonical, abb, --a, pruned, window, linear) at the longest T, "
                        "with decoding through the KV cache")
    p.add_argument("--lengths", type=_length_list, default=None,
                   help="--long: sequence lengths, comma-separated (default 1024,2048,4096,8192)")
    p.add_argument("--budget", type=_budget_seconds, default=None, metavar="SECONDS",
                   help="--long: wall seconds for the whole bench; rows that would not fit are skipped and "
                        f"listed (default {LONG_BUDGET_S:.0f})")
    p.add_argument("--profile", action="store_true",
                   help="--step: print where minqkv's step spends its time (cProfile) instead")
    p.set_defaults(run=cmd_bench)


def _thread_list(text: str) -> tuple:
    from ..kernels import MAX_NUM_THREADS

    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or max(counts) > MAX_NUM_THREADS:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: give thread counts from 1 to {MAX_NUM_THREADS} "
                                         "(the most the kernels use) separated by commas, e.g. --threads 1,2")
    return counts


def _length_list(text: str) -> tuple:
    from .bench_step import STUDY_DECODE_TOKENS

    try:
        lengths = tuple(int(part) for part in text.split(","))
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) <= STUDY_DECODE_TOKENS:
        raise argparse.ArgumentTypeError(f"--lengths {text!r}: give sequence lengths above {STUDY_DECODE_TOKENS} (the "
                                         "tokens decoded after the prompt) separated by commas, e.g. --lengths 1024,8192")
    return lengths


def _budget_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and math.isfinite(seconds)):  # also refuses nan
        raise argparse.ArgumentTypeError(f"--budget {text!r}: give the wall seconds the long bench may take, "
                                         "a number above 0, e.g. --budget 120")
    return seconds


def cmd_bench(args) -> int:
    from . import bench, bench_step

    if args.step and args.profile:
        print(bench_step.profile_step())
        return 0
    if args.long:
        result = bench_step.run_long_bench(lengths=args.lengths or bench_step.LONG_LENGTHS,
                                           threads=args.threads or (1,),
                                           budget_s=args.budget or bench_step.LONG_BUDGET_S)
        print(json.dumps(result, indent=2) if args.json else bench_step.format_long_table(result))
        return 0
    if args.step:
        if not bench_step.torch_available() and not args.json:
            print("PyTorch is not installed: timing minqkv's side only", file=sys.stderr)
        rows = bench_step.run_step_bench(threads=args.threads or (1, 2), rounds=args.rounds)
        print(json.dumps(rows, indent=2) if args.json else bench_step.format_step_table(rows))
        return 0
    rows = bench.run_bench(threads=args.threads)
    print(json.dumps(rows, indent=2) if args.json else bench.format_table(rows))
    return 0


# ---- ablate ------------------------------------------------------------------------------


def _add_ablate(sub) -> None:
    from .ablate import SWEEP_PRESETS

    p = sub.add_parser("ablate", help="train many variants side by side and tabulate them")
    p.add_argument("--preset", choices=sorted(SWEEP_PRESETS), default="quick",
                   help="the sweep: sizes, steps, seeds and variants (the README lists them)")
    p.add_argument("--data", default=None,
                   help="shakespeare | PATH | synthetic:TASK (default: the preset's own, else shakespeare)")
    p.add_argument("--out", default="ablate-out", help="folder for runs and result tables")
    p.add_argument("--variants", default=None,
                   help="'study', 'all' (the 15 codes), or labels like 'abc,abb,aaa+rotate,abb+mqa' "
                        "(default: the preset's own list, else 'study')")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per variant (default: the preset's)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps of every run (default: the preset's); a folder keeps one setting")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs in parallel processes")
    p.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run each run as a task on a Dask cluster: tcp://HOST:8786, or 'local' for "
                        "a LocalCluster of --jobs workers (needs pip install 'minqkv[dask]')")
    p.add_argument("--no-plots", action="store_true", help="write the tables only (no PNGs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_ablate)


def cmd_ablate(args) -> int:
    from .ablate import plan_sweep, run_sweep
    from .ablate_plots import write_plots
    from .ablate_tables import format_markdown, recall_rows

    rows = run_sweep(args.preset, args.data, args.out, args.variants, args.seeds, args.jobs,
                     progress=not args.quiet, dask=args.dask, steps=args.steps)
    plan = plan_sweep(args.preset, args.data, args.variants, args.seeds, args.steps)
    print(format_markdown(rows, plan))
    print(f"tables: {args.out}/results.md, results.csv, results.json")
    if not args.no_plots:
        try:
            paths = write_plots(args.out, rows, recall_rows(rows, plan) if "grid" in plan else None)
            print("plots: " + ", ".join(str(p) for p in paths))
        except ImportError as e:
            print(f"no plots: {e}")
    return 1 if any(r.get("failed") for r in rows) else 0


# ---- analyze -----------------------------------------------------------------------------


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="spectra, subspace overlaps and score symmetry of a checkpoint")
    _add_run_folder(p)
    p.add_argument("--data", default=None, help="held-out text (default: the run's own data)")
    p.add_argument("--heatmaps", default=None, help="folder for attention heat-map PNGs")
    p.add_argument("--subspace-dim", type=positive_int, default=None,
                   help="dimension r of the subspaces compared (default: the smaller effective rank)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_analyze)


def cmd_analyze(args) -> int:
    from .analysis import analyze_checkpoint, format_report

    result = analyze_checkpoint(args.out, data=args.data, heatmaps_dir=args.heatmaps,
                                subspace_dim=args.subspace_dim)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    for path in result.get("heatmaps", []):
        print(f"heat map: {path}")
    return 0
