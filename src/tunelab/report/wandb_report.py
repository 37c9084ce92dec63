"""The markdown report's study as a W&B report (wandb-workspaces): one runset per study (its W&B group),
runs grouped by what the study varies, and the same three figures: per-group loss curves (mean with a
std band), final metrics with error bars over seeds, and cost (wall time, peak memory).

Built as an object first, so it is checked offline (tests/test_studies.py); saved only when online.
"""

from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.report.compare import Comparison

CURVES = ("train/loss", "val/loss")
COST = ("train/fit_seconds", "train/tokens_processed", "train/peak_memory_mb")
STEP = "trainer/global_step"   # the x axis Lightning's WandbLogger logs


def workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise TunelabError("--wandb-report needs wandb-workspaces: pip install 'tunelab[wandb-report]'") from None
    return wr


def config_key(comparison: Comparison, key: str) -> str:
    """The W&B config key of a grouping key: a group choice (`adapter=lora`) is recorded as its `name`."""
    keys = {k for run in comparison.runs for k in run.config}
    return f"{key}.name" if key not in keys and f"{key}.name" in keys else key


def studies(comparison: Comparison) -> list[str]:
    return sorted({str(run.config["study"]) for run in comparison.runs if run.config.get("study")}) or ["default"]


def runsets(wr, comparison: Comparison, entity: str, project: str) -> list:
    groupby = [f"config.{config_key(comparison, k)}" for k in comparison.group_keys]
    return [wr.Runset(entity=entity, project=project, name=study, filters=f"Group = '{study}'", groupby=groupby)
            for study in studies(comparison)]


def panels(wr, metrics: list[str]) -> list:
    grouped = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}   # over the seeds of a group
    curves = [wr.LinePlot(title=c, x=STEP, y=[c], **grouped) for c in CURVES]
    finals = [wr.BarPlot(title=m, metrics=[m], **grouped) for m in metrics if m not in COST]
    cost = [wr.BarPlot(title=m, metrics=[m], **grouped) for m in COST]
    return curves + finals + cost


def build_wandb_report(comparison: Comparison, metrics: list[str], title: str, project: str, entity: str):
    """The Report object, not saved."""
    wr = workspaces()
    grid = wr.PanelGrid(runsets=runsets(wr, comparison, entity, project), panels=panels(wr, metrics))
    what = ", ".join(comparison.group_keys) or "nothing (one group)"
    return wr.Report(project=project, entity=entity, title=title,
                     description=f"{len(comparison.runs)} runs grouped by {what}; built by tunelab-report",
                     blocks=[wr.H1(text=title), wr.P(text=comparison.split_line()), grid])
