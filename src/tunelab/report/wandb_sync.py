"""Getting a study's runs to W&B: sync offline runs, or build a W&B report when online."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.report.runs import Run
from tunelab.run.loggers import wandb_has_key


def offline_runs(runs: list[Run]) -> list[Path]:
    return sorted(p for run in runs for p in (run.path / "wandb").glob("offline-run-*") if p.is_dir())


def wandb_hint(runs: list[Run]) -> str | None:
    """How to upload runs that were logged offline (None when there are none)."""
    offline = offline_runs(runs)
    if not offline:
        return None
    return (f"{len(offline)} run(s) were logged offline. To see them in W&B: `wandb login`, then\n\n"
            f"    wandb sync {' '.join(str(p) for p in offline[:3])}{' ...' if len(offline) > 3 else ''}\n\n"
            "(or `wandb sync --sync-all` inside each run dir's wandb/ folder); "
            "then `tunelab-report --wandb-report ...` builds the same panels as a W&B report.")


def create_wandb_report(comparison, title: str, project: str, entity: str | None, metrics: list[str]) -> str:
    """Save the study's W&B report (tunelab.report.wandb_report); needs a key and wandb-workspaces."""
    from tunelab.report.wandb_report import build_wandb_report, workspaces

    workspaces()
    if not wandb_has_key():
        raise TunelabError("--wandb-report needs W&B online: `wandb login` (or set WANDB_API_KEY), "
                           "and sync the offline runs first (see the W&B section of report.md)")
    import wandb

    report = build_wandb_report(comparison, metrics, title, project, entity or wandb.Api().default_entity)
    report.save()
    return report.url
