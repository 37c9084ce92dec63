"""Sweeps on a real Ray cluster (`ray start --head` on this machine, started and stopped by the test): each trial a
Ray task with 1 CPU, run in Ray's worker processes, every trial in the study ledger."""

import os

import pytest

from tests.cluster import ray_cluster
from tests.test_studies import QUICK, env, statuses, train
from tunelab.study import ledger


# ~80 s on 2 cores (a Ray head and its workers start): `make test-cluster` runs it; the default run keeps the same
# ledger from launcher worker processes (test_studies' parallel launcher) and the launcher's one-line refusal.
@pytest.mark.slow
@pytest.mark.cluster
def test_a_sweep_on_a_ray_cluster_runs_each_trial_as_a_ray_task_into_one_ledger(tmp_path):
    with ray_cluster(env(TUNELAB_FAIL_JOB="1")) as (address, auth):   # the workers' environment: trial 1 fails
        result = train(tmp_path, "-m", "hydra/launcher=ray_cluster", f"hydra.launcher.init.address={address}",
                       "hydra.launcher.remote.num_cpus=1", "seed=0,1", "study=ray", "hydra.sweep.dir=outputs/ray",
                       *QUICK, **auth)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "ray"
    assert statuses(sweep) == ["finished", "failed"]        # a failing trial is recorded, the sweep goes on
    assert "0 skipped (finished), 0 resumed, 0 retried, 2 started" in result.stdout
    rows = ledger.read(sweep)
    assert len({r.pid for r in rows.values()} | {os.getpid()}) == 3          # Ray's workers, not the sweep process
    assert "Connected to Ray cluster" in result.stdout + result.stderr
