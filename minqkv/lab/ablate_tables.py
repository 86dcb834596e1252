"""The tables of a sweep: one row per variant, means and spreads over seeds, compared with canonical.

    rows = aggregate(results, plan)      # the result.json records of a sweep's runs
    print(format_markdown(rows, plan))
    write_results(out, rows, plan)       # OUT/results.json, results.csv, results.md

Every row reports how fast its runs converge: the first evaluated step whose validation loss is
within 5% of canonical's final loss (CONVERGED). A figure a run could not measure is null in the
JSON, an empty cell in the tables.
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


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "steps_to_target" and key in row and row[key] is None:
        return "-"  # never reached
    if key not in row:
        return "failed" if key == "val_loss" and row.get("failed") else ""
    text = fmt.format(row[key])
    if key in WITH_SPREAD and row.get("seeds", 0) > 1:
        text += " ± " + fmt.format(row[key + "_std"])
    return text.replace("|", "\\|")  # seeds that pruned differently are 'a | b': not a new column


def format_markdown(rows: list, plan: dict) -> str:
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    seeds = plan["seeds"]
    lines.append("")
    lines.append(f"preset `{plan['preset']}`, data `{plan['data']}`, {seeds} seed(s) per variant"
                 + (" (mean ± std)" if seeds > 1 else "") + f"; model {plan['model']}; "
                 f"{plan['train']['steps']} steps of batch {plan['train']['batch_size']}.")
    if any("steps_to_target" in r for r in rows):
        lines.append(f"Steps to canonical's final loss x {CONVERGED}: the first evaluation (every "
                     f"{plan['train']['eval_interval']} steps) whose validation loss is at most {CONVERGED} x the "
                     "canonical run's final one, mean over seeds; '-': never reached "
                     "(gated runs: before pruning).")
    if any("(L=" in r["variant"] for r in rows):
        lines.append("Gated runs (L = weight of the expected number of open gates) report the pruned model; "
                     "their code is the per-layer codes it kept (seeds separated by |).")
    for r in rows:
        for error in r.get("errors", []):
            lines.append(f"- {r['variant']} failed: {error}")
    lines += [f"Note: {note}." for note in plan["notes"]]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list, plan: dict) -> None:
    (out / "results.json").write_text(json_text({"sweep": plan, "rows": rows}, indent=2) + "\n")
    keys = [k for k, _, _ in COLUMNS] + [k + "_std" for k in sorted(WITH_SPREAD)] + ["seeds", "failed"]
    keys = [k for k in keys if any(k in r for r in rows)]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(format_markdown(rows, plan))
