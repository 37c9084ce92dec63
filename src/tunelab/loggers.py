"""Loggers: W&B (offline without a key), CSV always, others as plain Lightning configs."""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_lightning.loggers import Logger, WandbLogger

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
