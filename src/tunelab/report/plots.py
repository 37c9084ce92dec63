"""PNG plots of a comparison: loss curves per group, final metrics with error bars, time and memory."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from tunelab.report.compare import Comparison  # noqa: E402
from tunelab.report.runs import FINISHED  # noqa: E402

CURVES = ("train/loss", "val/loss")


def colors(groups: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {g: cycle[i % len(cycle)] for i, g in enumerate(groups)}


def curve_plot(comparison: Comparison, path: Path) -> Path | None:
    """Every run's logged curve, coloured by group (seeds of one group share a colour)."""
    palette = colors(comparison.groups())
    fig, axes = plt.subplots(1, len(CURVES), figsize=(6 * len(CURVES), 4), squeeze=False)
    drawn = False
    for ax, column in zip(axes[0], CURVES):
        labelled = set()
        for run in comparison.runs:
            curves = run.curves()
            if column not in curves or "step" not in curves:
                continue
            points = curves[["step", column]].dropna()
            if points.empty:
                continue
            group = comparison.labels[run.name]
            style = "-" if run.status == FINISHED else ":"  # dotted: failed or incomplete
            ax.plot(points.step, points[column], style, color=palette[group], alpha=0.8, marker="." if len(points) < 4 else None,
                    label=None if group in labelled else group)
            labelled.add(group)
            drawn = True
        ax.set(title=column, xlabel="step", ylabel=column)
        if labelled:
            ax.legend(fontsize=7)
    return save(fig, path) if drawn else plt.close(fig)


def metric_bars(summary: pd.DataFrame, metrics: list[str], path: Path) -> Path | None:
    """Each metric's mean per group with ± std (sample std over seeds; none drawn for n=1)."""
    metrics = [m for m in metrics if summary[f"{m}:n"].sum() > 0]
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    palette = colors(list(summary.group))
    for ax, metric in zip(axes.flat, metrics):
        std = summary[f"{metric}:std"].fillna(0)
        ax.bar(range(len(summary)), summary[f"{metric}:mean"], yerr=std, capsize=4,
               color=[palette[g] for g in summary.group])
        ax.set_xticks(range(len(summary)), [short(g) for g in summary.group], rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{metric} (mean ± std)", fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    return save(fig, path)


def cost_plot(table: pd.DataFrame, path: Path) -> Path | None:
    """Wall time and peak memory of every run; failed or incomplete runs labelled as such."""
    columns = [c for c in ("train/fit_seconds", "train/peak_memory_mb") if c in table]
    if not columns:
        return None
    palette = colors(list(dict.fromkeys(table.group)))
    fig, axes = plt.subplots(1, len(columns), figsize=(max(6, 0.6 * len(table)) * len(columns) / 1.5, 4), squeeze=False)
    names = [f"{i}: {short(g)}" + ("" if s == FINISHED else f" [{s.upper()}]")
             for i, (g, s) in enumerate(zip(table.group, table.status))]
    for ax, column in zip(axes[0], columns):
        ax.bar(range(len(table)), table[column].fillna(0), color=[palette[g] for g in table.group],
               hatch=["" if s == FINISHED else "//" for s in table.status])
        ax.set_xticks(range(len(table)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(column, fontsize=9)
    return save(fig, path)


def short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
