"""The report as markdown: what varied, mean ± std per group, every run with its status, warnings."""

from __future__ import annotations

import math

import pandas as pd

from tunelab.report.compare import Comparison
from tunelab.report.runs import FINISHED


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def mean_std(row, metric: str) -> str:
    mean, std, n = row[f"{metric}:mean"], row[f"{metric}:std"], row[f"{metric}:n"]
    if n == 0:
        return "—"
    return f"{fmt(mean)} ± {fmt(std)} (n={n})" if n > 1 else f"{fmt(mean)} (n=1)"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows])


def render(comparison: Comparison, runs: pd.DataFrame, summary: pd.DataFrame, metrics: list[str],
           plots: dict[str, str], title: str, notes: dict[str, str] | None = None) -> str:
    """notes: a line under a plot's caption (e.g. which curves no run logged), also when nothing was drawn."""
    parts = [f"# {title}", ""]
    finished = (runs.status == FINISHED).sum()
    parts.append(f"{len(runs)} runs ({finished} finished, {len(runs) - finished} failed, diverged, collapsed, pruned or incomplete); "
                 f"grouped by {', '.join(f'`{k}`' for k in comparison.group_keys) or 'nothing (one group)'}; "
                 f"averaged over {', '.join(f'`{k}`' for k in comparison.seed_keys)}.")
    parts += ["", comparison.split_line()]
    if comparison.warnings:
        parts += ["", "## Warnings", "", *(f"- {w}" for w in comparison.warnings)]
    parts += ["", "## Per group (mean ± sample std over finished runs)", "",
              table(["group", "runs (ok/failed, diverged, collapsed or pruned/incomplete)", *metrics], group_rows(summary, metrics))]
    parts += ["", "## Every run", "",
              table(["#", "group", "seed", "status", *metrics, "dir"],
                    [[str(i), r["group"], fmt(r["seed"]), r["status"].upper() if r["status"] != FINISHED else r["status"],
                      *(fmt(r[m]) for m in metrics), f"`{r['run']}`"] for i, r in runs.iterrows()])]
    if comparison.differing:
        parts += ["", "## Config values that differ between runs", "",
                  ", ".join(f"`{k}`" for k in comparison.differing)]
    notes = {caption: note for caption, note in (notes or {}).items() if note}
    for caption in dict.fromkeys([*plots, *notes]):
        parts += ["", f"## {caption}"]
        parts += ["", f"![{caption}]({plots[caption]})"] if caption in plots else []
        parts += ["", notes[caption]] if caption in notes else []
    return "\n".join(parts) + "\n"


def group_rows(summary: pd.DataFrame, metrics: list[str]) -> list[list[str]]:
    rows = []
    for _, row in summary.iterrows():
        rows.append([row["group"], f"{row['runs']} ({row['finished']}/{row['failed']}/{row['incomplete']})",
                     *(mean_std(row, m) for m in metrics)])
    return rows
