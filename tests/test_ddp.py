"""`trainer=ddp` really runs 2 CPU processes (gloo) with the same result semantics as one."""

import pytest

from tests.helpers import read_metrics, run_ddp, run_train

SAME_RUN = ["trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.precision=32-true", "adapter=full",
            "optimizer.lr=1e-3", "trainer.limit_val_batches=null", "eval.metrics={}", "eval.compare_base=false", "scheduler.name=constant"]


def test_two_processes_at_the_same_global_batch_match_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp = run_ddp(ddp_dir, "data.batch_size=4", *SAME_RUN, timeout=600)
    single_dir = tmp_path / "single"
    run_train(single_dir, "data.batch_size=8", *SAME_RUN)
    single = read_metrics(single_dir)
    assert ddp["train"]["global_step"] == single["train"]["global_step"] == 8  # 64 examples / global batch 8
    assert ddp["tuned"]["test/loss"] == pytest.approx(single["tuned"]["test/loss"], rel=1e-4)
    assert ddp["train"]["val/loss"] == pytest.approx(single["train"]["val/loss"], rel=1e-4)
    # only rank 0 writes: one final folder, one CSV log, no per-rank Hydra dirs
    assert len(list(ddp_dir.rglob("metrics.csv"))) == 1
    assert not list(ddp_dir.glob(".pl_hydra*"))
