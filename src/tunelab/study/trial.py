"""A trial records itself in its study's ledger: running when it starts (with its process, so a re-run can
tell a live trial from a killed one), then finished, diverged, failed or interrupted, with its value and
W&B run id. A trial that was started before and left a checkpoint continues from it (`ckpt_path=auto`),
which also continues its W&B run (the id kept in the run dir). A trial of an Optuna search with a pruner reports
its validation metric to its Optuna trial (tunelab.study.pruning) and ends `pruned` when told to stop.

Two ways into a ledger: a job of a Hydra multirun (the sweep dir's ledger, its job number), and a run
started by `wandb agent` (WANDB_SWEEP_ID set: `ledger.wandb_sweeps_dir/<sweep id>`, a row per W&B run).
"""

from __future__ import annotations

import math
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.run import rundir
from tunelab.run.interrupts import RunInterrupted
from tunelab.study import ledger
from tunelab.study.ledger import DIVERGED, FAILED, FINISHED, INTERRUPTED, PRUNED, RUNNING
from tunelab.study.pruning import is_pruned


@dataclass
class Trial:
    sweep_dir: Path
    number: int
    value: float | None = None


def wandb_sweep_trial(sweep_dir: Path, run_id: str) -> int:
    """The row of this W&B run (the agent may resume it), else the next free number."""
    rows = ledger.read(sweep_dir)
    mine = [r.trial for r in rows.values() if run_id and r.wandb_id == run_id]
    return mine[0] if mine else max(rows, default=-1) + 1


def trial_of(cfg: DictConfig) -> Trial | None:
    from hydra.core.hydra_config import HydraConfig

    from tunelab.study.multirun import is_multirun

    if not cfg.get("ledger") or not cfg.ledger.enabled or os.environ.get("LOCAL_RANK", "0") != "0":
        return None  # DDP ranks > 0 run the same trial: rank 0 records it
    if is_multirun():
        hydra_cfg = HydraConfig.get()
        return Trial(Path(hydra_cfg.sweep.dir), int(hydra_cfg.job.num))
    sweep_id = os.environ.get("WANDB_SWEEP_ID")
    if sweep_id:
        sweep_dir = Path(cfg.ledger.wandb_sweeps_dir) / sweep_id
        return Trial(sweep_dir, wandb_sweep_trial(sweep_dir, os.environ.get("WANDB_RUN_ID", "")))
    return None


def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task]


def continue_from_checkpoint(cfg: DictConfig, run_dir: Path) -> bool:
    """A trial launched again into a dir that holds its checkpoint and no result resumes from it."""
    if cfg.get("ckpt_path") or rundir.is_finished(run_dir) or rundir.latest_checkpoint(run_dir) is None:
        return False
    with open_dict(cfg):
        cfg.ckpt_path = "auto"
    return True


def wandb_id(run_dir: Path) -> str:
    from tunelab.run.loggers import WANDB_ID_FILE

    path = run_dir / WANDB_ID_FILE
    return path.read_text().strip() if path.is_file() else os.environ.get("WANDB_RUN_ID", "")


def values_of(value) -> list[float]:
    """What a job returned, as a list (several objectives return one value each)."""
    if value is None:
        return []
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def outcome(run_dir: Path, value) -> str:
    if not rundir.is_finished(run_dir):
        return FAILED   # a TunelabError ended it (the job returned NaN and left FAILED)
    if is_pruned(run_dir):
        return PRUNED
    return DIVERGED if not all(map(math.isfinite, values_of(value))) else FINISHED


def add_pruning(cfg: DictConfig, trial: Trial) -> None:
    """A trial of an Optuna search with a pruner reports its validation metric to its Optuna trial."""
    from hydra.core.hydra_config import HydraConfig

    from tunelab.study.multirun import is_multirun

    sweeper = HydraConfig.get().sweeper if is_multirun() else None
    if not sweeper or not sweeper.get("pruner") or not sweeper.get("storage"):
        return
    with open_dict(cfg):
        if cfg.get("callbacks") is None:
            cfg.callbacks = {}
        cfg.callbacks.optuna_pruning = {"_target_": "tunelab.study.pruning.OptunaPruning",
                                        "storage": str(sweeper.storage), "study_name": str(sweeper.study_name),
                                        "trial": trial.number, "monitor": sweeper.get("prune_on") or "val/loss",
                                        "pruner": OmegaConf.to_container(sweeper.pruner),  # built with the callback
                                        "run_dir": str(cfg.paths.run_dir)}


@contextmanager
def recorded_trial(cfg: DictConfig):
    """Around one job: its ledger row says running, then how it ended. Yields the Trial (None: no ledger);
    the caller sets `trial.value` to what the job returns."""
    trial = trial_of(cfg)
    if trial is None:
        yield None
        return
    run_dir = Path(cfg.paths.run_dir)
    continue_from_checkpoint(cfg, run_dir)
    add_pruning(cfg, trial)
    row = ledger.read(trial.sweep_dir).get(trial.number)
    ledger.update(trial.sweep_dir, trial.number, status=RUNNING, overrides=task_overrides(), run_dir=str(run_dir),
                  started=row.started if row and row.started else ledger.now(), ended="", value="",
                  metric=ledger.metric_names(cfg.get("optimized_metric")) or "", attempts=(row.attempts if row else 0) + 1,
                  host=socket.gethostname(), pid=os.getpid(), wandb_id=os.environ.get("WANDB_RUN_ID", ""))
    status = FAILED
    try:
        yield trial
        status = outcome(run_dir, trial.value)
    except (RunInterrupted, KeyboardInterrupt):
        status = INTERRUPTED
        raise
    finally:
        value = "" if status == INTERRUPTED else ",".join(map(repr, values_of(trial.value)))
        ledger.update(trial.sweep_dir, trial.number, status=status, ended=ledger.now(), value=value,
                      wandb_id=wandb_id(run_dir))
