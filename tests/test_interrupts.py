"""SIGTERM / SIGINT during training lose at most the step in flight: a checkpoint at the next optimizer
step boundary, a FAILED marker that says how to resume, and a resume that ends at the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, make_cfg, read_metrics, run_train
from tunelab.run.interrupts import RunInterrupted

# 64 examples / batch 8 = 8 batches an epoch, 2 per optimizer step: 8 steps cross an epoch boundary.
COMMON = ["adapter=full", "trainer.max_steps=8", "trainer.max_epochs=5", "trainer.accumulate_grad_batches=2", "trainer.precision=32-true",
          "callbacks.checkpoint.every_n_train_steps=100", "eval.compare_base=false", "optimizer.lr=1e-3",
          "scheduler.warmup_steps=2"]
SIGNAL_AT = "+callbacks.signal={_target_: tests.helpers.SignalAt, batch: 4}"  # mid-step: batch 4 of (4, 5)


def trainable_weights(run_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


def test_sigterm_mid_accumulation_finishes_the_step_saves_and_resumes_to_the_same_weights(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # pytest-xdist workers ignore SIGINT; a plain run has Python's handler
    straight = tmp_path / "straight"
    run_train(straight, *COMMON)

    killed = tmp_path / "killed"
    killed.mkdir()
    with pytest.raises(RunInterrupted) as stopped:
        run_train(killed, *COMMON, SIGNAL_AT)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM at step 3 of 8" in stopped.value.message
    assert f"hydra.run.dir={killed} ckpt_path=auto" in stopped.value.message
    checkpoint = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3  # the step under way (batches 4 and 5) was finished, not lost
    assert not (killed / "metrics.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after fit

    run_train(killed, *COMMON, "ckpt_path=auto")
    assert read_metrics(killed)["train"]["global_step"] == 8
    a, b = trainable_weights(straight), trainable_weights(killed)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_cli_exits_non_zero_with_a_failed_marker_and_a_checkpoint(tmp_path, signum):
    run_dir = tmp_path / "run"
    kill = f"+callbacks.signal={{_target_: tests.helpers.SignalAt, batch: 2, signum: {signum}}}"
    cmd = [sys.executable, "-m", "tunelab.cli.train", *FAST, *COMMON, kill, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 128 + getattr(signal, signum), result.stderr[-2000:]
    failed = (run_dir / "FAILED").read_text()
    assert f"interrupted by {signum} at step 2 of 8" in failed and "ckpt_path=auto" in failed
    assert failed.strip() in result.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "metrics.json").exists()


def test_config_is_unchanged_by_the_interrupt_callback(tmp_path):
    # The callback is wired by train(), not by the config: a user's callbacks group stays as written.
    cfg = make_cfg(tmp_path)
    assert "interrupt" not in cfg.callbacks


def test_ckpt_path_auto_takes_the_newest_checkpoint_also_a_slurm_requeue_one(tmp_path):
    from tunelab.run import rundir

    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert rundir.latest_checkpoint(tmp_path) == last
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # what Lightning saves on SLURM's requeue signal
    hpc.write_bytes(b"x")
    os.utime(hpc, ns=(last.stat().st_mtime_ns + 10**9,) * 2)
    assert rundir.latest_checkpoint(tmp_path) == hpc
    assert rundir.resolve_ckpt_path("auto", tmp_path) == str(hpc)


def test_an_interruption_outside_training_says_how_to_go_on(tmp_path):
    """SIGTERM while the final evaluation runs: the end of training is checkpointed, so the message says resume."""
    from tunelab.run.rundir import with_resume_hint

    message = "interrupted by SIGTERM outside training"
    assert with_resume_hint(message, tmp_path).endswith("no checkpoint yet: start the run again")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    hinted = with_resume_hint(message, tmp_path)
    assert hinted.startswith(message) and f"tunelab-train hydra.run.dir={tmp_path} ckpt_path=auto" in hinted
    assert with_resume_hint(hinted, tmp_path) == hinted  # a message that says it already is kept
