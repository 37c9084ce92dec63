"""Resume needs only the run dir and loses nothing; a refused command touches nothing (through the CLI)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import FAST, read_metrics, wandb_records

REPO = Path(__file__).resolve().parents[1]
RUN = [*FAST, "adapter=full", "trainer.max_steps=8", "trainer.max_epochs=5", "trainer.precision=32-true",
       "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=100", "eval.compare_base=false",
       "optimizer.lr=1e-3", "logger=wandb"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tunelab.cli.train", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def wandb_history(run_dir: Path) -> list[tuple[int, float]]:
    """(global step, train/loss) logged to W&B over every offline part of the run (a resume adds one)."""
    import json

    rows = []
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/*.wandb")):
        for record in wandb_records(run_file):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                if "train/loss" in items:
                    rows.append((int(items["trainer/global_step"]), round(float(items["train/loss"]), 5)))
    return sorted(rows)


def training_rows(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [(int(r["step"]), round(float(r["train/loss"]), 5)) for r in csv.DictReader(file) if r.get("train/loss")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert cli(*RUN, f"hydra.run.dir={run_dir}").returncode == 0
    return run_dir


def test_resume_from_the_run_dir_alone_equals_an_uninterrupted_run(tmp_path, straight):
    run_dir = tmp_path / "run"
    killed = cli(*RUN, "+callbacks.signal={_target_: tests.helpers.SignalAt, batch: 3}", f"hydra.run.dir={run_dir}")
    assert killed.returncode == 143, killed.stderr[-2000:]
    recorded = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    killed_seconds = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)[
        "tunelab_training_summary"]["fit_seconds"]

    resumed = cli(f"hydra.run.dir={run_dir}", "ckpt_path=auto")  # nothing else: the run's own overrides
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == recorded
    assert not (run_dir / "FAILED").exists()
    a, b = read_metrics(straight), read_metrics(run_dir)
    assert b["train"]["global_step"] == a["train"]["global_step"] == 8
    assert b["train"]["tokens_processed"] == a["train"]["tokens_processed"] > 0  # no batch lost or counted twice
    assert b["train"]["train/loss"] == pytest.approx(a["train"]["train/loss"], rel=1e-5)
    assert b["tuned"]["test/loss"] == pytest.approx(a["tuned"]["test/loss"], rel=1e-5)
    assert b["train"]["fit_seconds"] > killed_seconds  # both parts counted
    assert training_rows(run_dir) == training_rows(straight)  # the CSV history before the kill is kept
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # one W&B run id, `wandb sync` joins them
    assert wandb_history(run_dir) == wandb_history(straight) == training_rows(straight)  # no step lost or doubled
    ours = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)


def test_a_resume_that_changes_the_training_is_refused_before_touching_the_run(tmp_path):
    run_dir = tmp_path / "run"
    assert cli(*RUN, "+callbacks.signal={_target_: tests.helpers.SignalAt, batch: 3}",
               f"hydra.run.dir={run_dir}").returncode == 143
    before = snapshot(run_dir)
    result = cli(f"hydra.run.dir={run_dir}", "ckpt_path=auto", "seed=7", "optimizer.lr=0.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: resuming {run_dir} with overrides that change")
    assert "seed=7 (was not set)" in result.stderr and "optimizer.lr=0.5 (was 1e-3)" in result.stderr
    assert snapshot(run_dir) == before


def test_a_refused_rerun_leaves_the_finished_run_byte_identical(straight):
    before = snapshot(straight)
    result = cli(*RUN, "seed=7", "optimizer.lr=0.5", f"hydra.run.dir={straight}")
    assert result.returncode == 2
    assert "already holds a finished run" in result.stderr.strip().splitlines()[-1]
    assert snapshot(straight) == before and not (straight / "FAILED").exists()
    resumed = cli(f"hydra.run.dir={straight}", "ckpt_path=auto")
    assert resumed.returncode == 2 and "nothing to resume" in resumed.stderr
    assert snapshot(straight) == before
