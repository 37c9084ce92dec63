"""Sweeps on a real SLURM (the one-machine cluster of scripts/setup_slurm.sh, 1 CPU per trial): trials as SLURM jobs
in the study ledger; a trial cancelled with `scancel` resumed by the re-run from its checkpoint while the finished
ones are skipped untouched; a requeue resumed through Lightning's SLURM (hpc) checkpoint. And without SLURM: one
line, no sweep dir.

The default suite runs the 2-trial sweep; `make test-cluster` runs the cancel and requeue checks (minutes each)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import ensure_slurm
from tests.test_studies import QUICK, env, files_of, statuses, train
from tunelab.study import ledger

# 1 CPU and 3 GB per trial on the 2-CPU node: two trials run at once; squeue polled every second
ON_SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.mem_gb=3", "hydra.launcher.poll_seconds=1", "hydra.launcher.grace_seconds=5"]


@pytest.fixture(scope="module")
def slurm():
    ensure_slurm()


def job_outputs(sweep: Path) -> str:
    """What the trials printed, from submitit's per-job logs."""
    return "".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit").glob("*/*.*")) if p.suffix in (".out", ".err"))


def wait_for(path: Path, seconds: int = 300) -> None:
    for _ in range(seconds * 2):
        if path.exists():
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} did not appear in {seconds} s")


def slurm_job_of(trial: int, sweep: Path) -> str:
    """The SLURM job running a trial of a sweep's first batch: array task N of the array (submitit's folder ID_N);
    a batch of one trial is a plain job (folder ID)."""
    folders = [f.name for f in (sweep / ".submitit").iterdir() if f.is_dir()]
    (job,) = [f for f in folders if f.endswith(f"_{trial}")] or [f for f in folders if f.isdigit()]
    return job


def test_a_slurm_sweep_without_slurm_is_one_line_and_leaves_no_sweep_dir(tmp_path):
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists())
    result = train(tmp_path, "-m", *ON_SLURM, "seed=0,1", "study=noslurm", *QUICK, PATH=path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: hydra/launcher=slurm cannot start here: sbatch is not on PATH"), line
    assert "`bash scripts/setup_slurm.sh` as root" in line and "hydra/launcher=parallel" in line, line
    assert not (tmp_path / "outputs").exists()


def test_a_two_trial_sweep_runs_as_slurm_jobs_into_one_ledger(slurm, tmp_path):
    result = train(tmp_path, "-m", *ON_SLURM, "seed=0,1", "study=slurm2", "hydra.sweep.dir=outputs/s2", *QUICK[:-1])
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "s2"
    assert statuses(sweep) == ["finished", "finished"]
    assert "0 skipped (finished), 0 resumed, 0 retried, 2 started" in result.stdout
    rows = ledger.read(sweep)
    assert os.getpid() not in {r.pid for r in rows.values()} and float(rows[1].value) > 0
    tasks = [f.name for f in (sweep / ".submitit").iterdir() if f.is_dir() and "_" in f.name]
    assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1   # one array, a task per trial


@pytest.mark.slow
@pytest.mark.cluster
def test_a_trial_cancelled_with_scancel_is_resumed_from_its_checkpoint_by_the_rerun(slurm, tmp_path):
    grid = ["-m", *ON_SLURM, "seed=0,1,2,3", "study=scancel", "hydra.sweep.dir=outputs/sc", *QUICK]
    sweep = tmp_path / "outputs" / "sc"
    # trial 1 waits after step 3 (its step-2 checkpoint written) until it is cancelled
    first = subprocess.Popen([sys.executable, "-m", "tunelab.cli.train", *grid], cwd=tmp_path, text=True,
                             env=env(TUNELAB_HOLD_JOB="1", TUNELAB_HOLD_STEP="3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(sweep / "1" / "HELD")
    subprocess.run(["scancel", slurm_job_of(1, sweep)], check=True)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: trial 1 (SLURM job ") and "CANCELLED" in err
    assert statuses(sweep) == ["finished", "running", "finished", "finished"]   # its process was killed
    untouched = {n: files_of(sweep / n) for n in "023"}

    again = train(tmp_path, *grid)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 skipped (finished), 1 resumed, 0 retried, 0 started" in again.stdout
    assert {n: files_of(sweep / n) for n in "023"} == untouched
    assert f"Restored all states from the checkpoint at {sweep.resolve()}/1/checkpoints/" in job_outputs(sweep)
    assert statuses(sweep) == ["finished"] * 4 and ledger.read(sweep)[1].attempts == 2


@pytest.mark.slow
@pytest.mark.cluster
def test_a_requeued_trial_resumes_through_lightnings_slurm_checkpoint(slurm, tmp_path):
    """SLURM's time-limit signal (SIGUSR1 here, sent by hand): Lightning saves hpc_ckpt_1.ckpt in the run dir and
    runs `scontrol requeue`; the job comes back under the same id and the trial continues from that checkpoint."""
    sweep = tmp_path / "outputs" / "rq"
    first = subprocess.Popen([sys.executable, "-m", "tunelab.cli.train", "-m", *ON_SLURM, "seed=0", "study=requeue",
                              "hydra.sweep.dir=outputs/rq", *QUICK], cwd=tmp_path, text=True,
                             env=env(TUNELAB_HOLD_JOB="0", TUNELAB_HOLD_STEP="3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(sweep / "0" / "HELD")
    job = slurm_job_of(0, sweep)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    logs = job_outputs(sweep)
    assert "Handling auto-requeue signal: 10" in logs and "Requeued SLURM job" in logs
    assert f"Restored all states from the checkpoint at {sweep.resolve()}/0/hpc_ckpt_1.ckpt" in logs
    row = ledger.read(sweep)[0]
    assert (row.status, row.attempts) == ("finished", 2)
