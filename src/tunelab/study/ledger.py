"""The study ledger: `ledger.csv` in a sweep dir, one row per trial.

Several processes write it at once (the sweep process plans, each trial records its own start and end,
joblib workers and Optuna workers on one study share it), so every change is a read-modify-write under
an exclusive `flock` on `ledger.csv.lock`, written to a temporary name and renamed: a reader never sees
half a file, and no writer loses another's row. (flock works on local disks and on NFS v4; a cluster
whose shared file system has no locks needs one ledger per worker.)
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

FILE = "ledger.csv"
PENDING, RUNNING, FINISHED, FAILED, DIVERGED, INTERRUPTED, PRUNED = (
    "pending", "running", "finished", "failed", "diverged", "interrupted", "pruned")
DONE = (FINISHED, DIVERGED, PRUNED)   # never run again: their files are left as they are


@dataclass
class Row:
    trial: int
    status: str = PENDING
    overrides: list[str] = field(default_factory=list)
    run_dir: str = ""
    wandb_id: str = ""
    started: str = ""
    ended: str = ""
    metric: str = ""                  # the optimized metric's name (several: comma-separated)
    value: str = ""                   # its value(s) ("" until the trial ends, "nan" when failed or diverged)
    attempts: int = 0
    host: str = ""
    pid: int = 0

    def to_csv(self) -> dict:
        return asdict(self) | {"overrides": json.dumps(self.overrides)}

    @classmethod
    def from_csv(cls, raw: dict) -> "Row":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        return cls(**values | {"trial": int(values["trial"]), "attempts": int(values.get("attempts") or 0),
                               "pid": int(values.get("pid") or 0),
                               "overrides": json.loads(values.get("overrides") or "[]")})

    def is_live(self) -> bool:
        """Running in a process that still exists on this machine (a dead or a foreign one: not live)."""
        if self.status != RUNNING or self.host != socket.gethostname() or not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def metric_names(metric) -> str | None:
    """optimized_metric as the ledger writes it: one name, or several joined by commas (several objectives)."""
    if metric is None or isinstance(metric, str):
        return metric
    return ",".join(map(str, metric))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def path_of(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / FILE


def read(sweep_dir: str | Path) -> dict[int, Row]:
    path = path_of(sweep_dir)
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        return {row.trial: row for row in map(Row.from_csv, csv.DictReader(handle))}


def write(sweep_dir: str | Path, rows: dict[int, Row]) -> None:
    path = path_of(sweep_dir)
    tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(rows[k].to_csv() for k in sorted(rows))
    os.replace(tmp, path)


@contextmanager
def editing(sweep_dir: str | Path):
    """The rows, to change in place; written back when the block ends, under the ledger's lock."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with open(path_of(sweep_dir).with_suffix(".csv.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read(sweep_dir)
        yield rows
        write(sweep_dir, rows)


def update(sweep_dir: str | Path, trial: int, **changes) -> Row:
    with editing(sweep_dir) as rows:
        row = rows.setdefault(trial, Row(trial=trial))
        for key, value in changes.items():
            setattr(row, key, value)
        return row
