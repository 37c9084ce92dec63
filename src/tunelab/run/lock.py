"""One run per run dir: a run (train, resume, evaluate into a dir) holds `run.lock` in its dir while it runs.

The lock is an flock(2) on that file, so the kernel drops it when the holder ends in any way (SIGKILL and
out-of-memory kills included); the file holds the holder's pid, host, start time and command, for the line
that refuses a second run. A clean end removes the file; a file left behind is a lock whose holder died,
taken over with a line saying so. The CLIs take the lock for a `hydra.run.dir=` given on the command line
before Hydra writes anything into the dir; `train()` and `tunelab-evaluate` take it (again, counted) for the
dir they run in, so a multirun job or an in-process caller holds it too. Only the first process of a launch
takes it: DDP/FSDP ranks that Lightning, torchrun or SLURM start run inside their rank 0's lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

LOCK_FILE = "run.lock"
# A launch's later processes: Lightning sets LOCAL_RANK (and NODE_RANK on other nodes), torchrun RANK, SLURM SLURM_PROCID.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


@dataclass
class Held:
    fd: int
    path: Path
    count: int = 1


_held: dict[Path, Held] = {}


def first_process_of_launch() -> bool:
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def key(run_dir: Path) -> Path:
    return Path(os.path.abspath(run_dir))


def read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode("utf-8", "replace")
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host")
    where = f"pid {pid} on {host}" if host and host != socket.gethostname() else f"pid {pid}"
    return f"{where}, started {holder.get('started', 'at an unknown time')}"


class RunDirInUse(TunelabError):
    """Another run holds the dir: the refused run must not touch it (no FAILED marker either)."""


def in_use_error(run_dir: Path, holder: dict) -> TunelabError:
    command = holder.get("command")
    return RunDirInUse(f"{run_dir} is in use by another run ({describe(holder)}"
                        f"{': ' + command if command else ''}); wait for it to end (or stop it), "
                        "or choose another hydra.run.dir")


def try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def holder_of(run_dir: Path) -> dict | None:
    """Who holds run_dir's lock now (None: nobody, or this process); reads only, writes nothing."""
    path = key(run_dir) / LOCK_FILE
    if key(run_dir) in _held or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # its holder just ended
        return None
    try:
        if try_flock(fd):
            return None  # left behind by a holder that is gone: free
        return read_holder(fd)
    finally:
        os.close(fd)  # also drops a lock taken above


def refuse_if_in_use(run_dir: Path | str | None) -> None:
    """Refuse, touching nothing, a run dir another run holds (before anything reads what the dir contains)."""
    if run_dir is None or not first_process_of_launch():
        return
    holder = holder_of(Path(run_dir))
    if holder is not None:
        raise in_use_error(run_dir, holder)


def open_locked(path: Path, run_dir: Path) -> int:
    """An fd on path holding the flock: the file that is at path now (not one a releasing run just removed)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not try_flock(fd):
            holder = read_holder(fd)
            os.close(fd)
            raise in_use_error(run_dir, holder)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: lock the file there now


def acquire(run_dir: Path) -> None:
    run_dir = key(run_dir)
    if run_dir in _held:
        _held[run_dir].count += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = open_locked(path, run_dir)
    stale = read_holder(fd)
    if stale:
        log.warning("%s: taking over the lock of a run that is gone (%s)", run_dir, describe(stale))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
          "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    _held[run_dir] = Held(fd, path)


def release(run_dir: Path) -> None:
    run_dir = key(run_dir)
    held = _held.get(run_dir)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _held[run_dir]
    try:
        held.path.unlink(missing_ok=True)  # while still locked, so no one locks the file being removed
    finally:
        os.close(held.fd)


@contextmanager
def holding(run_dir: Path | str | None):
    """Hold run_dir's lock inside the block (nested holds of one dir in one process are counted); a later
    process of a DDP/FSDP launch holds nothing, its rank 0 does."""
    if run_dir is None or not first_process_of_launch():
        yield
        return
    acquire(Path(run_dir))
    try:
        yield
    finally:
        release(Path(run_dir))
