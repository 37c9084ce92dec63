"""Compare run dirs: group by what was varied, mean ± std over seeds, markdown + PNG plots.

    from tunelab.report import build_report
    report = build_report(["outputs/full_vs_lora"], out="experiments/full_vs_lora/result")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tunelab.errors import TunelabError
from tunelab.report import markdown, pareto, plots
from tunelab.report.compare import Comparison, choose_metrics, compare, runs_table, summarize
from tunelab.report.runs import FINISHED, Run, load_runs  # noqa: F401  (Run: re-exported for callers)
from tunelab.report.wandb_sync import wandb_hint

log = logging.getLogger(__name__)

__all__ = ["Report", "build_report", "load_runs", "compare"]


@dataclass
class Report:
    comparison: Comparison
    runs: pd.DataFrame          # one row per run: group, seed, status, metrics
    summary: pd.DataFrame       # one row per group: <metric>:mean / :std / :n, counts by status
    metrics: list[str]
    markdown_path: Path
    plots: dict[str, Path]
    hint: str | None = None     # how to get the runs to W&B


def build_report(dirs: list[str | Path], out: str | Path | None = None, metrics: list[str] | None = None,
                 seed_keys: tuple[str, ...] = ("seed",), title: str | None = None) -> Report:
    runs = load_runs(dirs)
    finished = [r for r in runs if r.status == FINISHED]
    if not finished:
        counts = pd.Series([r.status for r in runs]).value_counts().to_dict()
        raise TunelabError(f"no finished runs (metrics.json) among the {len(runs)} run dirs found ({counts}); "
                           "wait for them to finish, or look at their FAILED files")
    comparison = compare(runs, seed_keys)
    chosen = choose_metrics(finished, metrics)
    table = runs_table(comparison, chosen)
    summary = summarize(table, chosen, comparison.groups())
    out = Path(out) if out else default_out(dirs)
    out.mkdir(parents=True, exist_ok=True)
    curves = "Loss curves (dotted: failed or incomplete runs)"
    drawn = {
        curves: plots.curve_plot(comparison, out / "curves.png"),
        "Final metrics per group (error bars: std over seeds)": plots.metric_bars(summary, chosen, out / "metrics.png"),
        "Wall time and peak memory per run": plots.cost_plot(table, out / "cost.png"),
    }
    drawn = {caption: path for caption, path in drawn.items() if path}
    text = markdown.render(comparison, table, summary, chosen, {c: p.name for c, p in drawn.items()},
                           title or f"Comparison of {len(runs)} runs", {curves: plots.curves_note(comparison)})
    text += pareto.front_section(runs, comparison.labels)
    hint = wandb_hint(runs)
    if hint:
        text += f"\n## W&B\n\n{hint}\n"
    (out / "report.md").write_text(text)
    table.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    return Report(comparison, table, summary, chosen, out / "report.md", drawn, hint)


def default_out(dirs: list[str | Path]) -> Path:
    first = Path(dirs[0])
    return (first if first.is_dir() else first.parent) / "report"
