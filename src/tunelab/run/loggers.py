"""Loggers: W&B (offline without a key), CSV always, others as plain Lightning configs; a resumed run
continues its history."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

WANDB_ID_FILE = "wandb_run_id"


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(run_dir: str, resuming: bool = False, offline: bool | None = None, run_config: dict | None = None,
                 **kwargs) -> WandbLogger:
    """A WandbLogger that is offline unless a key is set, records the resolved config, and that a
    resumed run continues."""
    run_dir = Path(run_dir)
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_has_key()
    id_file = run_dir / WANDB_ID_FILE
    if resuming and id_file.is_file():
        kwargs.update(id=id_file.read_text().strip(), resume="allow")
    return WandbLogger(save_dir=str(run_dir), offline=offline, config=run_config, **kwargs)


def remember_wandb_id(loggers: list[Logger], run_dir: Path) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            (run_dir / WANDB_ID_FILE).write_text(logger.experiment.id)


def finish_loggers(loggers: list[Logger], failed: bool) -> None:
    """Close every logger so the runs of a multirun never merge into one W&B run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish(exit_code=1 if failed else 0)
        else:
            logger.finalize("failed" if failed else "success")


def checkpoint_step(ckpt_path: str | None) -> int | None:
    """The optimizer step a checkpoint was saved at (memory-mapped: a full model's file is not read)."""
    if not ckpt_path:
        return None
    import torch

    return int(torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)["global_step"])


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, which deletes an existing metrics.csv, made to keep a resumed run's rows
    logged before its checkpoint (rows after it are logged again by the resumed training)."""

    def __init__(self, log_dir: str, before_step: int):
        path = Path(log_dir) / self.NAME_METRICS_FILE
        kept = []
        if path.is_file():
            with open(path, newline="") as file:
                kept = [row for row in csv.DictReader(file) if row.get("step") and int(float(row["step"])) < before_step]
        super().__init__(log_dir)
        if kept:
            self.metrics = [{k: v for k, v in row.items() if v != ""} for row in kept]
            self.save()


def keep_history(loggers: list[Logger], resume_step: int | None) -> None:
    """On a resume, CSV loggers continue the run's metrics.csv instead of starting it over."""
    if resume_step is None:
        return
    for logger in loggers:
        if isinstance(logger, CSVLogger) and logger._experiment is None:
            logger._experiment = KeepingExperimentWriter(logger.log_dir, resume_step)
