"""The run directory: what makes a run finished, failed, or resumable."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from tunelab.errors import TunelabError


def global_rank() -> int:
    """This process's rank as Lightning knows it (0 outside a distributed run)."""
    from pytorch_lightning.utilities import rank_zero_only  # here: the CLI reads this module before its pre-flight

    return rank_zero_only.rank


def rank_zero_only(fn):
    """Lightning's `rank_zero_only`, with Lightning imported at the first call rather than with this module."""
    @functools.wraps(fn)
    def on_rank_zero(*args, **kwargs):
        return fn(*args, **kwargs) if global_rank() == 0 else None
    return on_rank_zero


METRICS = "metrics.json"
FAILED = "FAILED"
CHECKPOINTS = "checkpoints"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / METRICS).is_file()


def guard(run_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to run into a directory that already holds a finished run."""
    if is_finished(run_dir) and not overwrite and not resuming:
        raise TunelabError(
            f"{run_dir} already holds a finished run (metrics.json); pass overwrite=true to replace it "
            "or choose another hydra.run.dir"
        )
    if global_rank() == 0:
        (run_dir / METRICS).unlink(missing_ok=True)
        (run_dir / FAILED).unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run: ours (checkpoints/*.ckpt) or the one Lightning saves in the run dir
    when SLURM signals a requeue (hpc_ckpt_N.ckpt)."""
    candidates = [*(run_dir / CHECKPOINTS).glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def with_resume_hint(message: str, run_dir: Path) -> str:
    """An interruption's message with how to go on: outside training (loading, evaluating, exporting) the signal
    handler does not know the run dir, so the hint is added where it is known."""
    if "resume with" in message:
        return message
    if latest_checkpoint(run_dir) is None:
        return f"{message}; no checkpoint yet: start the run again"
    return f"{message}; resume with: tunelab-train hydra.run.dir={run_dir} ckpt_path=auto (no step is redone)"


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`auto` finds the run dir's newest checkpoint (None when there is none yet)."""
    if not ckpt_path:
        return None
    if ckpt_path == "auto":
        found = latest_checkpoint(run_dir)
        return str(found) if found else None
    if not Path(ckpt_path).is_file():
        raise TunelabError(f"ckpt_path={ckpt_path} does not exist; give a .ckpt file or ckpt_path=auto")
    return ckpt_path


@rank_zero_only
def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary name and rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


@rank_zero_only
def mark_failed(run_dir: Path, message: str) -> None:
    if run_dir.is_dir() and not is_finished(run_dir):  # a finished run is never marked FAILED
        (run_dir / FAILED).write_text(message + "\n")
