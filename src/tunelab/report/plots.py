"""PNG plots of a comparison: loss curves per group, final metrics with error bars, time and memory."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from tunelab.report.compare import Comparison  # noqa: E402
from tunelab.report.runs import FINISHED, Run  # noqa: E402

CURVES = ("train/loss", "val/loss")
FEW_POINTS = 4  # below this many points a curve is drawn with markers
SUMMARY_PREFIXES = ("tuned/", "base/")  # columns only the end-of-run summary row of metrics.csv has


def colors(groups: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {g: cycle[i % len(cycle)] for i, g in enumerate(groups)}


def measured_rows(curves: pd.DataFrame) -> pd.DataFrame:
    """The CSV rows logged during training, without the end-of-run summary row: it repeats the last train/loss
    and val/loss one step later beside the final metrics (tuned/...), which would draw a flat extra segment."""
    summary = [c for c in curves.columns if c.startswith(SUMMARY_PREFIXES)]
    return curves[curves[summary].isna().all(axis=1)] if summary else curves


def logged_curves(comparison: Comparison) -> dict[str, list[tuple[Run, pd.DataFrame]]]:
    """Per curve, the runs that logged it with their (step, value) rows; a curve no run logged maps to []
    (val/loss when training stopped at trainer.max_steps before its first validation)."""
    tables = {run.name: measured_rows(run.curves()) for run in comparison.runs}
    logged = {}
    for column in CURVES:
        points = [(run, tables[run.name][["step", column]].dropna()) for run in comparison.runs
                  if {"step", column} <= set(tables[run.name].columns)]
        logged[column] = [(run, rows) for run, rows in points if not rows.empty]
    return logged


def curve_figure(comparison: Comparison):
    """Every run's logged curve, coloured by group (seeds of one group share a colour); a panel only for a
    curve some run logged, so that no empty panel stands for data that does not exist. None: none logged."""
    curves = {column: runs for column, runs in logged_curves(comparison).items() if runs}
    if not curves:
        return None
    palette = colors(comparison.groups())
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (column, runs) in zip(axes[0], curves.items()):
        labelled = set()
        for run, points in runs:
            group = comparison.labels[run.name]
            style = "-" if run.status == FINISHED else ":"  # dotted: failed or incomplete
            # a curve of a few points (one validation per epoch) is only visible with markers
            ax.plot(points.step, points[column], style, color=palette[group], alpha=0.8,
                    marker="o" if len(points) < FEW_POINTS else None, label=None if group in labelled else group)
            labelled.add(group)
        ax.set(title=column, xlabel="step", ylabel=column)
        ax.legend(fontsize=7)
    return fig


def curve_plot(comparison: Comparison, path: Path) -> Path | None:
    fig = curve_figure(comparison)
    return save(fig, path) if fig is not None else None


def curves_note(comparison: Comparison) -> str | None:
    """Which curves no run logged (and are therefore not drawn), in one line for report.md."""
    missing = [column for column, runs in logged_curves(comparison).items() if not runs]
    if not missing:
        return None
    note = f"Not drawn, no run logged them: {', '.join(f'`{c}`' for c in missing)}."
    if "val/loss" in missing:
        note += (" Validation runs at the end of an epoch by default, so a run that `trainer.max_steps` stopped "
                 "earlier (or with `trainer.limit_val_batches=0`) has no `val/loss`; `trainer.val_check_interval=N` "
                 "validates every N steps.")
    return note


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
    """Wall time, tokens processed and peak memory of every run; failed or incomplete runs labelled as such."""
    columns = [c for c in ("train/fit_seconds", "train/tokens_processed", "train/peak_memory_mb") if c in table]
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
