"""The plots of a sweep (optional: matplotlib): validation curves, final metric, parameters against
quality, and for a sweep of the gate penalty, quality against the Q/K/V matrices kept. A sweep over
block sizes and learning rates (the mqar preset: a hundred runs and more, too many for one line or
bar each) gets one plot instead: recall against memory, a variant per row and a block size per column.

    paths = write_plots(out, rows)           # rows: ablate_tables.aggregate's; PNGs in the sweep folder
    paths = write_plots(out, rows, recall)   # recall: ablate_tables.recall_rows(rows, plan)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .ablate_run import run_folder
from .ablate_tables import recall_layout


def write_plots(out, rows: list, recall: list | None = None) -> list:
    """Validation curves, final metric with seed spread, parameters against the metric, and for a
    sweep of the gate penalty the metric against the Q/K/V matrices kept; given recall rows, only
    recall.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.transforms import offset_copy
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'minqkv[plot]' (the tables are written)") from None
    out = Path(out)
    if recall:
        paths = [_plot_recall_vs_memory(plt, out / "recall.png", recall)]
        plt.close("all")
        return paths
    done = [r for r in rows if "val_loss" in r]
    metric = "val_bpc" if any("val_bpc" in r for r in done) else "accuracy"
    paths = [out / "curves.png", out / "final.png", out / "tradeoff.png"]

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(done):
        color = f"C{i % 10}"
        for seed in range(row["seeds"]):  # seed 0 named in the legend, the others thinner
            steps, values = _curve(out, row["variant"], metric, seed)
            ax.plot(steps, values, color=color, linestyle=("-", "--", ":")[i // 10 % 3],
                    label=row["variant"] if seed == 0 else None, linewidth=1.5 if seed == 0 else 0.8)
    ax.set(xlabel="step", ylabel=metric, title="validation during training (every seed, thick: seed 0; gated: before pruning)")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(8, 5))
    names = [r["variant"] for r in done]
    ax.bar(names, [r[metric] for r in done], yerr=[r.get(metric + "_std", 0) for r in done], capsize=3)
    low = min(r[metric] for r in done)
    ax.set_ylim(low * 0.95 if metric == "val_bpc" else 0, None)
    ax.set(ylabel=metric, title=f"final {metric} (error bars: std over seeds)")
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.savefig(paths[1], dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(7, 5))
    values = [r[metric] for r in done]
    gap = 0.035 * ((max(values) - min(values)) or 1)  # about one line of 7-point text on this plot
    right_of_marker = offset_copy(ax.transData, fig=fig, x=6, units="points")  # a marker hides a leading '-'
    last_label = {}  # variants with one parameter count share an x: a label too close moves up
    for row in sorted(done, key=lambda r: r[metric]):
        x, y = row["attention_params"], row[metric]
        label_y = max(y, last_label.get(x, -math.inf) + gap)
        ax.scatter(x, y)
        ax.text(x, label_y, row["variant"], fontsize=7, va="center", transform=right_of_marker)
        last_label[x] = label_y
    ax.set(xlabel="attention parameters", ylabel=metric, title="parameters against quality")
    fig.savefig(paths[2], dpi=120, bbox_inches="tight")
    swept = [r for r in done if "(L=" in r["variant"] and "projections_kept" in r]
    if swept:
        paths.append(_plot_pruning(plt, out / "pruning.png", done, swept, metric))
    plt.close("all")
    return paths


def _plot_pruning(plt, path: Path, done: list, swept: list, metric: str) -> Path:
    """Static variants as points, the gated sweep (pruned models) as a curve, against matrices kept."""
    fig, ax = plt.subplots(figsize=(7, 5))
    static = [r for r in done if r not in swept and "projections_kept" in r]
    for row in static:
        ax.scatter(row["projections_kept"], row[metric], color="tab:gray")
        ax.annotate(row["variant"], (row["projections_kept"], row[metric]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    swept = sorted(swept, key=lambda r: r["projections_kept"])
    ax.errorbar([r["projections_kept"] for r in swept], [r[metric] for r in swept],
                yerr=[r.get(metric + "_std", 0) for r in swept], marker="o", capsize=3, color="tab:blue",
                label="gated, pruned (one point per L)")
    for row in swept:
        ax.annotate(row["variant"].split("(")[1].rstrip(")"), (row["projections_kept"], row[metric]),
                    fontsize=8, xytext=(4, -10), textcoords="offset points", color="tab:blue")
    ax.set(xlabel="attention Q/K/V projection matrices kept", ylabel=metric,
           title="pruning by hard-concrete gates against static variants")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _plot_recall_vs_memory(plt, path: Path, recall: list) -> Path:
    """A table in colour: a row per variant (fewest state bytes first, as in results.md), a column
    per block size T, each cell the best accuracy written in it. A hundred runs as points with
    labels would overprint; cells never do."""
    sizes, names, state_text = recall_layout(recall)
    cells = {(r["variant"], r["block_size"]): r for r in recall}
    accuracy = [[cells.get((name, T), {}).get("accuracy", math.nan) for T in sizes] for name in names]
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(sizes), 0.8 + 0.32 * len(names)))
    image = ax.imshow(accuracy, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            text = "failed" if math.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if value > 0.6 else "white")
    ax.set_yticks(range(len(names)), [f"{name}  ({state_text[name]} B)" for name in names], fontsize=8)
    ax.set_xticks(range(len(sizes)), [f"T = {T}" for T in sizes])
    ax.xaxis.tick_top()
    fig.colorbar(image, ax=ax, label="answer accuracy (best learning rate)", shrink=0.6)
    ax.set_title("recall against memory\n(rows: fewest decoding-state bytes per token per layer first)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _curve(out: Path, variant: str, metric: str, seed: int = 0) -> tuple:
    path = run_folder(out, variant, seed) / "metrics.jsonl"
    if not path.exists():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records], [r.get(metric, math.nan) for r in records]
