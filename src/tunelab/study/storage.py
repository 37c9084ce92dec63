"""Where an Optuna study lives (`hydra.sweeper.storage`), opened the same way by the sweeper and by a trial that
reports to it (pruning):

    null                              in memory: this process only, lost when it ends
    sqlite:///outputs/x/optuna.db     one machine, any number of worker processes (the default: in the sweep dir)
    journal:/shared/fs/optuna.log     Optuna's journal file: several machines on a shared file system, no server
    postgresql://user@host:5432/db    a database server: several machines, no shared file system needed
    (any SQLAlchemy URL Optuna takes: mysql+pymysql://..., ...)
"""

from __future__ import annotations

import fcntl
import importlib.util
import time
from pathlib import Path

JOURNAL = "journal:"


def postgres_driver(url: str) -> str:
    """`postgresql://` means psycopg2 to SQLAlchemy; tunelab installs psycopg 3, so that spelling gets it."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None:
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def open_storage(spec):
    """An Optuna storage for a `hydra.sweeper.storage` value (None: in memory)."""
    import optuna

    if not spec:
        return None
    spec = str(spec)
    if spec.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        path = Path(spec[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if spec.startswith("sqlite:///"):
        path = Path(spec[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        # workers started together on a new study would all create its tables at once: one at a time;
        # a long lock timeout so that workers on one machine wait for each other's writes instead of failing
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return optuna.storages.RDBStorage(spec, engine_kwargs={"connect_args": {"timeout": 300}})
    return server_storage(postgres_driver(spec))


def server_storage(url: str, attempts: int = 5):
    """RDBStorage on a database server. Workers started together on a new study all create its tables at once,
    and all but one fail (PostgreSQL: a duplicate type); the tables exist by then, so those try again."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:  # pool_pre_ping: reconnect after a dropped connection instead of failing the trial
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)
