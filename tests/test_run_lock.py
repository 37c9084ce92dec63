"""One run per run dir: two real processes started at once into one dir, a stale lock, evaluate into a held dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import FAST, run_train
from tunelab.errors import TunelabError
from tunelab.run import lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
# Holds run_dir's lock through the API, says so, then waits (or dies at once with SIGKILL, leaving the file).
HOLDER = textwrap.dedent("""
    import os, signal, sys, time
    from tunelab.run import lock
    lock.acquire(sys.argv[1])
    print("held", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)
""")


def cli(tool: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"tunelab.cli.{tool}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def holder(run_dir: Path, then: str = "wait") -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), then], stdout=subprocess.PIPE, text=True,
                               env=ENV)
    assert process.stdout.readline().strip() == "held"
    return process


def refusal(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def test_two_runs_started_at_once_into_one_dir_one_is_refused_untouched(tmp_path):
    run_dir = tmp_path / "twin"
    # Long enough that the refused one ends first; the one that runs is then stopped by SIGTERM.
    args = [*FAST, "trainer.max_steps=100000", "callbacks.checkpoint.every_n_train_steps=100000",
            "eval.compare_base=false", f"hydra.run.dir={run_dir}"]
    both = [cli("train", *args), cli("train", *args)]
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in both) and time.monotonic() < deadline:
        time.sleep(0.2)
    refused = next(p for p in both if p.poll() is not None)
    running = next(p for p in both if p is not refused)
    try:
        assert refused.wait() == 2
        line = refusal(refused.stderr.read())
        assert f"{run_dir} is in use by another run (pid {running.pid}, started 20" in line, line
        assert running.poll() is None  # the other run goes on, and the refused one left no mark in its dir
        assert not (run_dir / "FAILED").exists() and not (run_dir / "metrics.json").exists()
        assert json.loads((run_dir / lock.LOCK_FILE).read_text())["pid"] == running.pid
    finally:
        running.send_signal(signal.SIGTERM)
        running.communicate(timeout=300)  # drains its pipes: a run blocked writing to a full one never ends
    assert not (run_dir / lock.LOCK_FILE).exists()  # a run that ends releases its dir


def test_a_lock_whose_holder_died_is_taken_over_with_a_line(tmp_path, caplog):
    dead = holder(tmp_path, "die")
    assert dead.wait() == -signal.SIGKILL
    left = json.loads((tmp_path / lock.LOCK_FILE).read_text())
    assert left["pid"] == dead.pid
    lock.refuse_if_in_use(tmp_path)  # not in use: its holder is gone
    with caplog.at_level("WARNING", logger="tunelab"), lock.holding(tmp_path):
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    (line,) = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert f"pid {dead.pid}, started {left['started']}" in line
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_a_held_dir_refuses_train_and_evaluate_but_not_the_ranks_of_its_own_launch(tmp_path, monkeypatch):
    process = holder(tmp_path)
    try:
        with pytest.raises(TunelabError, match=f"in use by another run \\(pid {process.pid}, started"):
            run_train(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [lock.LOCK_FILE]  # refused before writing a file
        evaluate = cli("evaluate", "model=tiny_llama", f"hydra.run.dir={tmp_path}")
        assert evaluate.wait(timeout=300) == 2
        assert f"pid {process.pid}" in refusal(evaluate.stderr.read())
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank Lightning started: its rank 0 holds the dir
        lock.refuse_if_in_use(tmp_path)
        with lock.holding(tmp_path):
            pass
    finally:
        process.kill()
        process.wait()


def test_holds_nest_within_one_process_and_the_last_release_frees_the_dir(tmp_path):
    with lock.holding(tmp_path):
        with lock.holding(tmp_path):  # the CLI holds the dir, then train() again
            pass
        assert (tmp_path / lock.LOCK_FILE).exists()
        lock.refuse_if_in_use(tmp_path)  # this process's own hold is no refusal
    assert not (tmp_path / lock.LOCK_FILE).exists()
