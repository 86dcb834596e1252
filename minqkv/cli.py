"""The `minqkv` command: train, sample, variants, gradcheck, bench, ablate, analyze.

Each subcommand is a small function that parses its flags into the package's own configs
and calls the package; nothing here computes anything itself.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import __version__

SAMPLE_PROMPT = "ROMEO:\n"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        print(f"minqkv {args.command}: error: {e}", file=sys.stderr)
        return 2


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
    return parser


# ---- train -------------------------------------------------------------------------------


def _add_train(sub) -> None:
    from .model import GPTConfig
    from .train import TrainConfig

    m, t = GPTConfig(), TrainConfig()
    p = sub.add_parser("train", help="train a char GPT with one attention variant",
                       description="Train a character-level GPT. With no arguments: the canonical "
                       "variant on Shakespeare, then a sample.")
    p.add_argument("--variant", default=m.variant,
                   help="code such as abb, or a name such as shared-kv (codes starting with '-' "
                   "need the = form: --variant=-ab)")
    p.add_argument("--data", default=t.data, help="shakespeare | PATH to a UTF-8 text | synthetic:TASK")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {t.steps})")
    p.add_argument("--out", default=t.out, help="folder for checkpoint and metrics")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    for flag, default, kind in [("n-layer", m.n_layer, int), ("n-head", m.n_head, int),
                                ("n-kv-head", None, int), ("n-embd", m.n_embd, int),
                                ("block-size", m.block_size, int), ("dropout", m.dropout, float)]:
        p.add_argument(f"--{flag}", type=kind, default=default)
    for flag in ("batch-size", "lr", "min-lr", "warmup-steps", "weight-decay", "grad-clip",
                 "eval-interval", "eval-iters", "beta1", "beta2", "gate-penalty", "prune-threshold"):
        default = getattr(t, flag.replace("-", "_"))
        p.add_argument(f"--{flag}", type=type(default), default=default)
    p.add_argument("--dtype", choices=["float32", "float64"], default=m.dtype)
    p.add_argument("--rotate", action="store_true", help="learned orthogonal rotation of K per head")
    p.add_argument("--pos2d", action="store_true", help="learned 2-D positional bias on the scores")
    p.add_argument("--gate", action="store_true", help="gated projections, pruned after training")
    p.add_argument("--no-out-proj", action="store_true", help="drop the output projection")
    p.add_argument("--no-tie", action="store_true", help="separate output head (no weight tying)")
    p.add_argument("--sample-tokens", type=int, default=300, help="characters to sample at the end (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)


def cmd_train(args) -> int:
    from .checkpoint import load_checkpoint
    from .model import GPTConfig
    from .train import TrainConfig, train

    steps = args.steps
    if args.resume and steps is None:
        steps = load_checkpoint(args.out)[0]["train_config"]["steps"]
    train_config = TrainConfig(
        data=args.data, out=args.out, steps=steps or TrainConfig.steps, batch_size=args.batch_size,
        lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        beta1=args.beta1, beta2=args.beta2, grad_clip=args.grad_clip, eval_interval=args.eval_interval,
        eval_iters=args.eval_iters, gate_penalty=args.gate_penalty,
        prune_threshold=args.prune_threshold, seed=args.seed)
    model_config = GPTConfig(
        variant=args.variant, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head,
        n_embd=args.n_embd, block_size=args.block_size, dropout=args.dropout, rotate=args.rotate,
        pos2d=args.pos2d, gate=args.gate, out_proj=not args.no_out_proj, tie_weights=not args.no_tie,
        dtype=args.dtype, seed=args.seed)
    final = train(model_config, train_config, resume=args.resume, progress=not args.quiet)
    print(_summary(final))
    if args.sample_tokens > 0 and "val_bpc" in final:
        print(f"\n--- sample ({args.sample_tokens} characters, temperature 0.8) ---")
        print(_sample_text(args.out, SAMPLE_PROMPT, args.sample_tokens, 0.8, None, args.seed))
    return 0


def _summary(final: dict) -> str:
    metric = (f"val bpc {final['val_bpc']:.3f}" if "val_bpc" in final
              else f"accuracy {100 * final['accuracy']:.1f}%")
    lines = [f"{final['variant']}: val loss {final['val_loss']:.4f}, {metric}, "
             f"{final['params']:,} params, {final['tokens_per_s']:,.0f} tokens/s, "
             f"{final['wall_s']:.0f} s"]
    if "pruned_codes" in final:
        lines.append(f"pruned to per-layer codes {final['pruned_codes']}: val loss "
                     f"{final['val_loss_before_pruning']:.4f} -> {final['val_loss_after_pruning']:.4f}")
    return "\n".join(lines)


# ---- sample ------------------------------------------------------------------------------


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained checkpoint")
    p.add_argument("--ckpt", required=True, help="the --out folder of a training run")
    p.add_argument("--prompt", default=SAMPLE_PROMPT)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_sample)


def cmd_sample(args) -> int:
    if args.tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
    print(_sample_text(args.ckpt, args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
    return 0


def _sample_text(ckpt, prompt, tokens, temperature, top_k, seed) -> str:
    from .checkpoint import load_model

    model, tokenizer, _ = load_model(ckpt)
    if not prompt:
        raise ValueError("--prompt must not be empty")
    if prompt == SAMPLE_PROMPT and not set(prompt) <= set(tokenizer.chars):
        prompt = tokenizer.chars[0]  # the default prompt needs characters this corpus lacks
    ids = tokenizer.encode(prompt)[None, :]  # (1, T)
    out = model.generate(ids, tokens, temperature, top_k, np.random.default_rng(seed))
    return tokenizer.decode(out[0])


# ---- variants ----------------------------------------------------------------------------


def _add_variants(sub) -> None:
    from .variants import PRESETS

    p = sub.add_parser("variants", help="parameters, FLOPs and KV cache of every variant")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=None)
    p.add_argument("--block-size", type=int, default=128, help="context length for FLOPs")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes of a known model (overrides --d-model, --n-head, --block-size)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_variants)


def cmd_variants(args) -> int:
    from .variants import format_rows, preset_rows, variant_rows

    if args.preset:
        rows = preset_rows(args.preset, n_kv_head=args.n_kv_head)
    else:
        rows = variant_rows(n_embd=args.d_model, n_head=args.n_head, n_kv_head=args.n_kv_head,
                            block_size=args.block_size)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


# ---- gradcheck ---------------------------------------------------------------------------


def _add_gradcheck(sub) -> None:
    p = sub.add_parser("gradcheck", help="float64 finite-difference check of every op or variant")
    p.add_argument("--variant", default=None, help="check a tiny GPT with this variant, or 'all'")
    p.add_argument("--json", action="store_true")
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
    p = sub.add_parser("bench", help="GFLOPS of the C core next to NumPy/OpenBLAS")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args) -> int:
    from .bench import format_table, run_bench

    rows = run_bench()
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


# ---- ablate ------------------------------------------------------------------------------


def _add_ablate(sub) -> None:
    from .ablate import PRESETS

    p = sub.add_parser("ablate", help="train many variants side by side and tabulate them")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--data", default="shakespeare", help="shakespeare | PATH | synthetic:TASK")
    p.add_argument("--out", default="ablate-out", help="folder for runs and result tables")
    p.add_argument("--variants", default="study",
                   help="'study' (default), 'all' (the 15 codes), or labels like 'abc,abb,aaa+rotate,abb+mqa'")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the preset's)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_ablate)


def cmd_ablate(args) -> int:
    from .ablate import format_markdown, plan_sweep, run_sweep, write_plots

    rows = run_sweep(args.preset, args.data, args.out, args.variants, args.seeds, args.jobs,
                     progress=not args.quiet)
    print(format_markdown(rows, plan_sweep(args.preset, args.data, args.variants, args.seeds)))
    print(f"tables: {args.out}/results.md, results.csv, results.json")
    if not args.no_plots:
        try:
            paths = write_plots(args.out, rows)
            print("plots: " + ", ".join(str(p) for p in paths))
        except ImportError as e:
            print(f"no plots: {e}")
    return 1 if any(r.get("failed") for r in rows) else 0


# ---- analyze -----------------------------------------------------------------------------


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="spectra, subspace overlaps and score symmetry of a checkpoint")
    p.add_argument("--ckpt", required=True, help="the --out folder of a training run")
    p.add_argument("--data", default=None, help="held-out text (default: the run's own data)")
    p.add_argument("--heatmaps", default=None, help="folder for attention heat-map PNGs")
    p.add_argument("--subspace-dim", type=int, default=None,
                   help="dimension r of the subspaces compared (default: the smaller effective rank)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_analyze)


def cmd_analyze(args) -> int:
    from .analysis import analyze_checkpoint, format_report

    result = analyze_checkpoint(args.ckpt, data=args.data, heatmaps_dir=args.heatmaps,
                                subspace_dim=args.subspace_dim)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    for path in result.get("heatmaps", []):
        print(f"heat map: {path}")
    return 0
