"""What a re-run of a sweep does with each trial, decided from the ledger before anything is launched.

`LedgerLauncher` wraps whatever launcher Hydra made (basic, joblib, submitit): finished and diverged
trials are not launched at all (so Hydra never rewrites their `.hydra/` or appends to their log: their
files stay untouched), failed ones only with `ledger.retry_failed=true`, interrupted ones are launched
into their own dir where the trial resumes from its newest checkpoint (tunelab.study.trial), and a trial
whose overrides differ from the ledger's row of the same number stops the sweep before anything runs.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf

from tunelab.errors import TunelabError
from tunelab.run import rundir
from tunelab.run.resume import is_harmless
from tunelab.study import ledger
from tunelab.study.ledger import DONE, FAILED, PENDING, RUNNING, Row, metric_names

log = logging.getLogger("tunelab")

def identity(overrides: Sequence[str]) -> list[str]:
    """What makes a trial this trial: its overrides minus those that change nothing trained (hydra.*,
    ledger.*, logger, ...), in a fixed order."""
    return sorted(o for o in overrides if not is_harmless(o))


def changed_line(number: int, row: Row, overrides: Sequence[str], sweep_dir: Path) -> str:
    before, after = identity(row.overrides), identity(overrides)
    was = " ".join(o for o in before if o not in after) or "(nothing more)"
    now = " ".join(o for o in after if o not in before) or "(nothing more)"
    return (f"the grid changed: trial {number} of {ledger.path_of(sweep_dir)} ran `{was}`, this command makes it "
            f"`{now}`; re-run the original command to continue that study, or give a new hydra.sweep.dir")


def action_of(row: Row | None, retry_failed: bool) -> str:
    if row is None or (row.status == PENDING and not row.attempts):
        return "started"
    if row.status in DONE:
        return "skipped"
    if row.status == FAILED:
        return "retried" if retry_failed else "skipped failed"
    if row.status == RUNNING and row.is_live():
        return "running elsewhere"   # another worker on this machine has it now
    return "resumed"                 # killed (running, process gone), interrupted, or pending after a start


def set_aside_checkpoints(run_dir: Path, attempt: int) -> None:
    """A retry starts over: the failed attempt's checkpoints move aside, so `ckpt_path=auto` cannot pick them."""
    ckpts = run_dir / rundir.CHECKPOINTS
    if ckpts.is_dir():
        shutil.move(ckpts, run_dir / f"{rundir.CHECKPOINTS}.failed-{attempt}")


def skipped_return(overrides: Sequence[str], row: Row) -> JobReturn:
    """What the sweeper gets for a trial that is not launched: the recorded value(s) (NaN when none)."""
    try:
        values = [float(v) for v in row.value.split(",")]
    except ValueError:
        values = [math.nan]
    value = values[0] if len(values) == 1 else values
    return JobReturn(overrides=list(overrides), working_dir=row.run_dir, task_name="tunelab",
                     status=JobStatus.COMPLETED, _return_value=value)


def segments(numbers: list[int]) -> list[list[int]]:
    """Runs of consecutive numbers: the launchers number a batch's jobs from its first index on."""
    out: list[list[int]] = []
    for n in numbers:
        if out and out[-1][-1] + 1 == n:
            out[-1].append(n)
        else:
            out.append([n])
    return out


class LedgerLauncher(Launcher):
    def __init__(self, launcher: Launcher, sweep_dir: str | Path, retry_failed: bool, metric: str | None,
                 numbering: Callable[[int], list[int]] | None = None) -> None:
        self.launcher, self.sweep_dir, self.retry_failed, self.metric = launcher, Path(sweep_dir), retry_failed, metric
        self.numbering = numbering   # the Optuna sweeper numbers jobs by trial number
        self.counts: Counter = Counter()

    def setup(self, **kwargs) -> None:
        self.launcher.setup(**kwargs)

    def plan(self, jobs: dict[int, Sequence[str]]) -> dict[int, str]:
        """Each job's action; the jobs to run are written as pending (with their overrides) first."""
        with ledger.editing(self.sweep_dir) as rows:
            changed = [changed_line(n, rows[n], o, self.sweep_dir) for n, o in jobs.items()
                       if n in rows and identity(rows[n].overrides) != identity(o)]
            if changed:
                raise TunelabError(changed[0] + (f" (and {len(changed) - 1} more trials)" if len(changed) > 1 else ""))
            actions = {n: action_of(rows.get(n), self.retry_failed) for n in jobs}
            for n, action in actions.items():
                if action in ("started", "resumed", "retried"):
                    row = rows.setdefault(n, Row(trial=n, run_dir=str((self.sweep_dir / str(n)).resolve())))
                    row.overrides, row.metric = list(jobs[n]), self.metric or ""
                    if action == "retried":
                        set_aside_checkpoints(Path(row.run_dir), row.attempts)
                        row.status = PENDING
        return actions

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        numbers = (self.numbering(len(job_overrides)) if self.numbering
                   else list(range(initial_job_idx, initial_job_idx + len(job_overrides))))
        jobs = dict(zip(numbers, job_overrides))
        actions = self.plan(jobs)
        self.counts.update(actions.values())
        rows = ledger.read(self.sweep_dir)
        returns = {n: skipped_return(jobs[n], rows[n]) for n, a in actions.items()
                   if a in ("skipped", "skipped failed", "running elsewhere")}
        for segment in segments([n for n in numbers if n not in returns]):
            try:
                launched = self.launcher.launch([jobs[n] for n in segment], initial_job_idx=segment[0])
            except Exception as err:  # the launcher itself (a job's own failure comes back as a failed JobReturn)
                self.unplan([n for n in segment if actions[n] == "started"])
                raise TunelabError(f"the launcher could not run trials {segment[0]}-{segment[-1]}: "
                                   f"{type(err).__name__}: {err}") from err
            returns |= dict(zip(segment, launched))
        return [returns[n] for n in numbers]

    def unplan(self, numbers: list[int]) -> None:
        """Trials written as pending that never started leave the ledger again (and an empty sweep dir goes): a
        launcher that could not start leaves no trials waiting that `tunelab-report` would ask to re-run."""
        with ledger.editing(self.sweep_dir) as rows:
            for n in numbers:
                if n in rows and rows[n].status == PENDING and not rows[n].attempts:
                    del rows[n]
                    self.counts["started"] -= 1
            empty = not rows
        if empty and not any(p.name.isdigit() for p in self.sweep_dir.iterdir()):
            shutil.rmtree(self.sweep_dir, ignore_errors=True)

    def summary(self) -> str:
        said = [f"{self.counts['skipped']} skipped (finished)", f"{self.counts['resumed']} resumed",
                f"{self.counts['retried']} retried", f"{self.counts['started']} started"]
        if self.counts["skipped failed"]:
            said.append(f"{self.counts['skipped failed']} failed left as they are (ledger.retry_failed=true retries them)")
        if self.counts["running elsewhere"]:
            said.append(f"{self.counts['running elsewhere']} running in another process")
        return f"study ledger {ledger.path_of(self.sweep_dir)}: {', '.join(said)}"

def check_grid(sweep_dir: Path, jobs: dict[int, Sequence[str]]) -> None:
    """The whole grid against the ledger before the first batch runs (a sweep may run in several batches)."""
    rows = ledger.read(sweep_dir)
    changed = [changed_line(n, rows[n], o, sweep_dir) for n, o in jobs.items()
               if n in rows and identity(rows[n].overrides) != identity(o)]
    extra = sorted(set(rows) - set(jobs))
    if not changed and extra and rows[extra[0]].attempts:
        changed = [f"the grid changed: {ledger.path_of(sweep_dir)} has trial {extra[0]} (`{' '.join(identity(rows[extra[0]].overrides))}`), "
                   f"which this command no longer makes; re-run the original command, or give a new hydra.sweep.dir"]
    if changed:
        raise TunelabError(changed[0] + (f" (and {len(changed) - 1} more trials)" if len(changed) > 1 else ""))


def wrap(launcher: Launcher, config, numbering: Callable[[int], list[int]] | None = None) -> Launcher:
    """The launcher Hydra made, behind the ledger (unless ledger.enabled=false)."""
    settings = config.get("ledger")
    if not settings or not settings.enabled:
        return launcher
    return LedgerLauncher(launcher, config.hydra.sweep.dir, bool(settings.retry_failed),
                          metric_names(config.get("optimized_metric")), numbering)


def check_launcher(config) -> None:
    """A launcher that cannot start is one line, before anything is written (no sweep dir, no pending trials):
    the same check as the CLI's pre-flight (config.requirements), for sweeps started another way."""
    from tunelab.config.requirements import check_optional

    launcher = OmegaConf.select(config, "hydra.launcher")
    if launcher is not None:
        check_optional(launcher)
