"""Read run dirs: resolved config, overrides, metrics.json, CSV curves, and whether the run finished."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

FINISHED, FAILED, INCOMPLETE, DIVERGED = "finished", "failed", "incomplete", "diverged"
# Finished, but an on-policy run's policy collapsed (metrics.json: train/collapsed_at_step; methods/rl/collapse.py).
COLLAPSED = "collapsed"
COLLAPSED_AT = "train/collapsed_at_step"
PRUNED = "pruned"   # stopped early by an Optuna pruner (PRUNED in its run dir; tunelab.study.pruning)
# What a study ledger says of a trial with no result yet (tunelab.study.ledger): counted as incomplete.
PENDING, RUNNING, INTERRUPTED = "pending", "running", "interrupted"
NOT_DONE = (INCOMPLETE, PENDING, RUNNING, INTERRUPTED)
# A folder is a run dir when it holds one of these (a run that died early may have only .hydra/).
RUN_MARKERS = ("resolved_config.yaml", "metrics.json", "FAILED", "PRUNED", ".hydra/config.yaml")


@dataclass
class Run:
    path: Path
    status: str
    config: dict = field(default_factory=dict)      # resolved config, flattened to dotted keys
    overrides: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)     # metrics.json flattened: tuned/test/loss, train/fit_seconds, ...
    error: str | None = None

    @property
    def name(self) -> str:
        return str(self.path)

    def curves(self) -> pd.DataFrame:
        """The logged CSV rows (one per step and kind); empty when the run logged none."""
        csv = self.path / "csv" / "metrics.csv"
        return pd.read_csv(csv) if csv.is_file() else pd.DataFrame()


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value}
        return out
    return {prefix.rstrip("."): tree}


def flatten_metrics(metrics: dict) -> dict:
    """metrics.json's sections as `section/name` keys, the way the train function returns them."""
    flat = {}
    for section, values in metrics.items():
        if isinstance(values, dict):
            flat |= {f"{section}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return flat


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def is_evaluation_dir(path: Path) -> bool:
    """A `tunelab-evaluate` output dir (conf/evaluate.yaml's keys): an evaluation of some model, not a training run."""
    for name in ("resolved_config.yaml", ".hydra/config.yaml"):
        if (path / name).is_file():
            config = yaml.safe_load((path / name).read_text()) or {}
            return isinstance(config, dict) and {"target", "eval_from_run"} <= set(config)
    return False


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Every run dir at or below the given paths (a multirun folder, a study folder, single runs)."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise TunelabError(f"{path} does not exist; give run dirs or folders that contain them (e.g. outputs/<study>)")
        if is_run_dir(path):
            found.append(path)
            continue
        found += sorted({marker_dir for marker in RUN_MARKERS for marker_dir in
                         (p.parent.parent if marker.startswith(".hydra") else p.parent for p in path.rglob(marker))
                         if is_run_dir(marker_dir) and "report" not in marker_dir.relative_to(path).parts})
    unique = list(dict.fromkeys(p.resolve() for p in found))
    evaluations = [p for p in unique if is_evaluation_dir(p)]
    unique = [p for p in unique if p not in evaluations]
    skipped = f" ({len(evaluations)} tunelab-evaluate output dirs skipped: evaluations, not training runs)" if evaluations else ""
    if evaluations and unique:
        log.warning("report: skipped %d tunelab-evaluate output dir(s) (evaluations, not training runs): %s",
                    len(evaluations), ", ".join(str(p) for p in evaluations[:3]) + (", ..." if len(evaluations) > 3 else ""))
    if not unique:
        raise TunelabError(f"no run dirs under {', '.join(map(str, paths))}{skipped}: a run dir holds resolved_config.yaml, "
                           "metrics.json or FAILED (outputs/<study>/runs/<time> or outputs/<study>/multirun/<time>/<n>)")
    return unique


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def load_run(path: Path) -> Run:
    config = read_yaml(path / "resolved_config.yaml") or read_yaml(path / ".hydra" / "config.yaml") or {}
    overrides = read_yaml(path / ".hydra" / "overrides.yaml") or []
    if (path / "metrics.json").is_file():
        metrics = flatten_metrics(json.loads((path / "metrics.json").read_text()))
        status = DIVERGED if diverged(metrics, flatten(config).get("optimized_metric")) else \
            COLLAPSED if COLLAPSED_AT in metrics else FINISHED
        status = PRUNED if (path / "PRUNED").is_file() else status
    else:
        status, metrics = (FAILED if (path / "FAILED").is_file() else INCOMPLETE), {}
    error = (path / "FAILED").read_text().strip() if (path / "FAILED").is_file() else None
    return Run(path=path, status=status, config=flatten(config), overrides=[str(o) for o in overrides],
               metrics=metrics, error=error)


def diverged(metrics: dict, optimized_metric) -> bool:
    """Finished, but the loss (or a metric a sweep optimized) is NaN or infinite."""
    optimized = optimized_metric if isinstance(optimized_metric, list) else [optimized_metric]
    keys = [k for k in metrics if k.startswith("tuned/") and k.endswith("loss")] + optimized
    return any(k in metrics and not math.isfinite(float(metrics[k])) for k in keys if k)


def ledger_rows(paths: list[str | Path]) -> list:
    """The rows of every study ledger at or below the given paths."""
    from tunelab.study import ledger

    files = {f.resolve() for path in map(Path, paths) if path.is_dir() for f in path.rglob(ledger.FILE)}
    return [row for f in sorted(files) for row in ledger.read(f.parent).values()]


def with_ledger(runs: list[Run], rows: list) -> list[Run]:
    """Runs as their ledgers tell them: a trial with no result shows as pending, running or interrupted (not
    just incomplete), a trial not started yet is listed, and a run dir kept elsewhere (W&B sweeps) is read."""
    by_path = {run.path: run for run in runs}
    for row in rows:
        path = Path(row.run_dir).resolve() if row.run_dir else None
        run = by_path.get(path)
        if run is None:
            run = load_run(path) if path and is_run_dir(path) else Run(path=path or Path(f"trial-{row.trial}"),
                                                                       status=PENDING, overrides=list(row.overrides))
            by_path[run.path] = run
        if run.status == INCOMPLETE and row.status in (PENDING, RUNNING, INTERRUPTED):
            run.status = row.status
    return list(by_path.values())


def load_runs(paths: list[str | Path]) -> list[Run]:
    rows = ledger_rows(paths)
    found = find_run_dirs_or_none(paths) if rows else find_run_dirs(paths)
    return with_ledger([load_run(path) for path in found], rows)


def find_run_dirs_or_none(paths: list[str | Path]) -> list[Path]:
    """A ledger alone is a study (all its trials pending, or their run dirs elsewhere)."""
    try:
        return find_run_dirs(paths)
    except TunelabError:
        return []
