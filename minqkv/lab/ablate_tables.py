"""The tables of a sweep: one row per variant, means and spreads over seeds, compared with canonical.

    rows = aggregate(results, plan)      # the result.json records of a sweep's runs
    print(format_markdown(rows, plan))
    write_results(out, rows, plan)       # OUT/results.json, results.csv, results.md

Every row reports how fast its runs converge: the first evaluated step whose validation loss is
within 5% of canonical's final loss (CONVERGED). A figure a run could not measure is null in the
JSON, an empty cell in the tables.

A sweep over block sizes and learning rates (the mqar preset) adds the recall-vs-memory table
(recall_rows): each variant's best accuracy over the learning rates at each block size, beside the
bytes of state a token costs one layer.

State bytes per token (decode_state_bytes_per_token) come from AttentionSpec.decode_state_floats,
which counts every kind of attention the same way: the decoder's state after a context of T tokens,
divided by T. For softmax attention that is the KV cache a token adds; a window keeps only its last
W tokens; linear attention keeps one state of constant size, whatever T.

A sweep with extrapolation (the baselines preset) adds the validation loss at 2 and 4 times the
block size (val_loss_2x, ...), blank for models with a learned position table, and reports
the state bytes per token instead of the measured KV cache (which linear attention does not have).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ..atomic import json_text

CONVERGED = 1.05  # a run has converged at the first step whose val loss <= CONVERGED x canonical's final


def aggregate(results: list, plan: dict) -> list:
    """One row per variant: means and standard deviations over seeds, change against canonical."""
    rows = []
    for run in plan["runs"]:
        mine = [r for r in results if r["variant"] == run["variant"]]
        ok = [r for r in mine if r["status"] == "ok"]
        row = {"variant": run["variant"], "label": run["label"], "seeds": len(ok),
               "failed": len(mine) - len(ok),
               "errors": sorted({r["error"] for r in mine if r["status"] != "ok"})}
        if ok:
            row.update(_mean_over_seeds(ok))
            if "projections" in row:  # out of the 3 per layer of canonical attention
                row["projections"] += f"/{3 * plan['model']['n_layer']}"
            for key in extrapolation_keys(plan):  # None: a model with a position table cannot read that far
                row[key] = _mean_or_none([r.get(key) for r in ok])
            if "extrapolation" in plan:
                row["decode_state_bytes_per_token"] = decode_state_bytes_per_token(run, plan)
        rows.append(row)
    canonical = next((r for r in rows if r["variant"] == "abc" and "val_loss" in r), None)
    for row in rows:
        if canonical is not None and "val_loss" in row:
            metric = "val_bpc" if "val_bpc" in row else "accuracy"
            row["delta_vs_canonical"] = row[metric] - canonical[metric]
            row["delta_pct"] = 100 * row["delta_vs_canonical"] / canonical[metric]
            mine = [r for r in results if r["variant"] == row["variant"] and r["status"] == "ok"]
            row["steps_to_target"] = steps_to_reach(mine, CONVERGED * canonical["val_loss"])
    return rows


def steps_to_reach(results: list, target: float):
    """Mean over seeds of the first evaluated step whose val loss <= target; None when a seed never does."""
    steps = []
    for result in results:
        reached = [step for step, loss in result.get("eval_curve", []) if loss <= target]
        if not reached:
            return None
        steps.append(reached[0])
    return float(np.mean(steps)) if steps else None


def _mean_over_seeds(ok: list) -> dict:
    """The figures of a variant's finished runs: mean and standard deviation over seeds."""
    first = ok[0]
    summary = {key: first[key] for key in ("code", "attention_params", "params", "flops_per_token")}
    summary["code"] = " | ".join(dict.fromkeys(r["code"] for r in ok))  # gated seeds may prune differently
    if all("projections_kept" in r for r in ok):
        summary["projections_kept"] = float(np.mean([r["projections_kept"] for r in ok]))
        summary["projections"] = " | ".join(dict.fromkeys(str(r["projections_kept"]) for r in ok))
    for metric in ("val_loss", "unpruned_val_loss", "val_bpc", "accuracy", "tokens_per_s",
                   "decode_ms_per_token", "kv_cache_bytes_per_token", "peak_rss_mb"):
        values = [r[metric] for r in ok if _measured(r.get(metric))]
        if values:
            summary[metric] = float(np.mean(values))
            summary[metric + "_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return summary


def extrapolation_keys(plan: dict) -> list:
    """['val_loss_2x', 'val_loss_4x'] for a plan that evaluates at 2 and 4 times the block size."""
    return [f"val_loss_{multiple}x" for multiple in plan.get("extrapolation", [])]


def _mean_or_none(values: list):
    """The mean over seeds, or None when no seed measured the figure."""
    measured = [v for v in values if _measured(v)]
    return float(np.mean(measured)) if measured else None


def decode_state_bytes_per_token(run: dict, plan: dict, layers=None) -> float:
    """Bytes of decoding state per token at a full context (T = the run's block size), summed over
    `layers` (default: all): AttentionSpec.decode_state_floats(T) x the dtype's size / T."""
    from ..model import GPTConfig

    config = GPTConfig(**{**plan["model"], **run["overrides"]})
    layers = range(config.n_layer) if layers is None else layers
    floats = sum(config.attention_spec(layer).decode_state_floats(config.block_size) for layer in layers)
    return floats * np.dtype(config.dtype).itemsize / config.block_size


def _measured(value) -> bool:
    """A figure, not a hole: result.json has null (older ones NaN) where a run could not measure one."""
    return isinstance(value, (int, float)) and math.isfinite(value)


COLUMNS = [  # (key, header, format)
    ("variant", "variant", "{}"), ("code", "code", "{}"), ("projections", "Q/K/V matrices", "{}"),
    ("attention_params", "attn params", "{:,}"),
    ("params", "params", "{:,}"), ("flops_per_token", "FLOPs/token", "{:,}"),
    ("val_loss", "val loss", "{:.4f}"), ("unpruned_val_loss", "val loss before pruning", "{:.4f}"),
    ("val_bpc", "val bpc", "{:.4f}"), ("accuracy", "accuracy", "{:.4f}"),
    ("delta_vs_canonical", "Δ vs abc", "{:+.4f}"), ("delta_pct", "Δ %", "{:+.2f}%"),
    ("steps_to_target", f"steps to canonical's final loss x {CONVERGED}", "{:,.0f}"),
    ("tokens_per_s", "train tokens/s", "{:,.0f}"), ("decode_ms_per_token", "decode ms/token", "{:.2f}"),
    ("kv_cache_bytes_per_token", "KV bytes/token", "{:,.0f}"), ("peak_rss_mb", "peak MB", "{:.0f}"),
]
WITH_SPREAD = {"val_loss", "unpruned_val_loss", "val_bpc", "accuracy"}
STATE_COLUMN = ("decode_state_bytes_per_token", "state bytes/token", "{:,.0f}")


def columns(plan: dict) -> list:
    """COLUMNS for this plan: with extrapolation, the losses at longer contexts after val loss,
    and the state bytes per token (every kind of attention) in place of the measured KV cache."""
    if "extrapolation" not in plan:
        return COLUMNS
    chosen = []
    for column in COLUMNS:
        if column[0] == "kv_cache_bytes_per_token":
            chosen.append(STATE_COLUMN)
            continue
        chosen.append(column)
        if column[0] == "val_loss":
            chosen += [(f"val_loss_{m}x", f"val loss at {m}T", "{:.4f}") for m in plan["extrapolation"]]
    return chosen


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "steps_to_target" and key in row and row[key] is None:
        return "-"  # never reached
    if key in row and row[key] is None:
        return ""  # not measurable for this model, e.g. a longer context than its position table
    if key not in row:
        return "failed" if key == "val_loss" and row.get("failed") else ""
    text = fmt.format(row[key])
    if key in WITH_SPREAD and row.get("seeds", 0) > 1:
        text += " ± " + fmt.format(row[key + "_std"])
    return text.replace("|", "\\|")  # seeds that pruned differently are 'a | b': not a new column


def format_markdown(rows: list, plan: dict) -> str:
    shown = [c for c in columns(plan) if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in shown) + " |",
             "|" + "|".join("---" for _ in shown) + "|"]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in shown) + " |" for r in rows]
    seeds = plan["seeds"]
    lines.append("")
    lines.append(f"preset `{plan['preset']}`, data `{plan['data']}`, {seeds} seed(s) per variant"
                 + (" (mean ± std)" if seeds > 1 else "") + f"; model {plan['model']}; "
                 f"{plan['train']['steps']} steps of batch {plan['train']['batch_size']}"
                 + "".join(f"; {key.replace('_', ' ')} {values}" for key, values in plan.get("grid", {}).items())
                 + ".")
    if any("steps_to_target" in r for r in rows):
        lines.append(f"Steps to canonical's final loss x {CONVERGED}: the first evaluation (every "
                     f"{plan['train']['eval_interval']} steps) whose validation loss is at most {CONVERGED} x the "
                     "canonical run's final one, mean over seeds; '-': never reached "
                     "(gated runs: before pruning).")
    if "extrapolation" in plan:
        T = plan["model"]["block_size"]
        lines.append(f"Val loss at kT: validation text in sequences of k x {T} tokens, longer than any "
                     "seen in training; blank for models whose positions are a learned table of "
                     f"{T} rows. State bytes/token: what a decoder keeps for a sequence after {T} tokens "
                     "(AttentionSpec.decode_state_floats, all layers) / "
                     f"{T}: the KV cache for softmax attention, the last W tokens' for a window, "
                     "linear attention's constant state (S and z) spread over the tokens.")
    if any("(L=" in r["variant"] for r in rows):
        lines.append("Gated runs (L = weight of the expected number of open gates) report the pruned model; "
                     "their code is the per-layer codes it kept (seeds separated by |).")
    for r in rows:
        for error in r.get("errors", []):
            lines.append(f"- {r['variant']} failed: {error}")
    lines += [f"Note: {note}." for note in plan["notes"]]
    if "grid" in plan:
        lines += ["", format_recall_markdown(recall_rows(rows, plan), plan).rstrip("\n")]
    return "\n".join(lines) + "\n"


# ---- recall against memory: a sweep over block sizes and learning rates -------------------------


def recall_rows(rows: list, plan: dict) -> list:
    """One row per (variant, block size): the best accuracy over the learning rates tried, that
    learning rate, and the state bytes per token per layer; variants in the order planned."""
    by_variant = {r["variant"]: r for r in rows}
    best = {}  # (variant without the grid point, block size) -> its row
    for run in plan["runs"]:
        name = run["variant"].rsplit("(", 1)[0]
        block_size = run["overrides"].get("block_size", plan["model"]["block_size"])
        lr = {**plan["train"], **run.get("train_overrides", {})}.get("lr")  # None: TrainConfig's default
        row = best.setdefault((name, block_size), {
            "variant": name, "block_size": block_size,
            "state_bytes_per_token": decode_state_bytes_per_token(run, plan, layers=[0]),
            "learning_rates_tried": 0})
        row["learning_rates_tried"] += 1
        accuracy = by_variant.get(run["variant"], {}).get("accuracy")
        if accuracy is not None and accuracy > row.get("accuracy", -1.0):
            row.update(accuracy=accuracy, lr=lr)
    return list(best.values())


def recall_layout(recall: list) -> tuple:
    """-> (block sizes ascending, variants with the fewest state bytes at the longest T first,
    {variant: its state bytes per token as text, one figure per T where it changes with T})."""
    sizes = sorted({r["block_size"] for r in recall})
    state_bytes = {}  # variant -> [its state bytes per token at each block size, in order]
    for r in sorted(recall, key=lambda r: r["block_size"]):
        state_bytes.setdefault(r["variant"], []).append(r["state_bytes_per_token"])
    names = sorted(state_bytes, key=lambda name: state_bytes[name][-1])  # stable among equals
    return sizes, names, {name: " / ".join(f"{b:,.0f}" for b in dict.fromkeys(state_bytes[name])) for name in names}


def format_recall_markdown(recall: list, plan: dict) -> str:
    """Variants as rows (fewest state bytes first), block sizes as columns: best accuracy (its lr).

    A window's or linear attention's state per token depends on T: its cell lists one figure per T."""
    sizes, names, state_text = recall_layout(recall)
    cells = {(r["variant"], r["block_size"]): r for r in recall}
    lines = ["| variant | state bytes/token/layer | " + " | ".join(f"accuracy T={T} (lr)" for T in sizes) + " |",
             "|" + "|".join("---" for _ in range(2 + len(sizes))) + "|"]
    for name in names:
        row = [name, state_text[name]]
        for T in sizes:
            cell = cells.get((name, T), {})
            lr = f" ({cell['lr']:g})" if cell.get("lr") is not None else ""
            row.append(f"{cell['accuracy']:.3f}{lr}" if "accuracy" in cell else "failed")
        lines.append("| " + " | ".join(row) + " |")
    tried = max(r["learning_rates_tried"] for r in recall)
    lines += ["", f"Recall against memory: each variant's best answer accuracy over {tried} learning rate(s) "
              f"at each block size T, data `{plan['data']}`; state bytes/token/layer: what one layer's "
              "decoder keeps after T tokens (AttentionSpec.decode_state_floats) / T, in "
              f"{plan['model'].get('dtype', 'float32')}: the K and V a token adds to the cache, or linear "
              "attention's constant state spread over T (one figure per T where it changes with T)."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list, plan: dict) -> None:
    document = {"sweep": plan, "rows": rows}
    if "grid" in plan:
        document["best_per_block_size"] = recall_rows(rows, plan)
    (out / "results.json").write_text(json_text(document, indent=2) + "\n")
    keys = [k for k, _, _ in (*columns(plan), *COLUMNS)] + [k + "_std" for k in sorted(WITH_SPREAD)] + ["seeds", "failed"]
    keys = [k for k in dict.fromkeys(keys) if any(k in r for r in rows)]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(format_markdown(rows, plan))
