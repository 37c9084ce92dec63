"""Studies at scale: the ledger of a killed grid re-run (finished untouched, killed resumed, failed retried only
when asked, a changed grid refused), an Optuna SQLite study resumed and shared by two workers, one study on a real
PostgreSQL server and one in a journal file shared by processes, a launcher that fails at launch, parallel trials,
a W&B sweep run in the same ledger, and the reports (markdown and the W&B Report object, offline)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_report import config, fake_run
from tunelab.paths import REPO_DIR
from tunelab.report import build_report
from tunelab.study import ledger
from tunelab.study.storage import open_storage

# The tiny model, 4 steps with a checkpoint every 2, loss-only evaluation: a trial takes a few seconds.
QUICK = ["debug=fast", "trainer.enable_progress_bar=false", "eval.metrics=null", "eval.compare_base=false",
         "data.test_size=8", "data.val_size=4", "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2",
         "+callbacks.fault._target_=tests.faults.InjectFault"]


def env(**extra) -> dict:
    paths = os.pathsep.join([str(REPO_DIR), str(REPO_DIR / "src")])   # tests.faults, and this checkout's src/
    return {**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def train(cwd: Path, *args: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab.cli.train", *args], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=600)


def files_of(run_dir: Path) -> dict:
    """Every file of a run dir with its content hash and modification time."""
    return {str(p.relative_to(run_dir)): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def statuses(sweep: Path) -> list[str]:
    return [row.status for _, row in sorted(ledger.read(sweep).items())]


def test_a_killed_grid_resumes_skips_finished_trials_untouched_and_retries_failed_ones_only_when_asked(tmp_path):
    grid = ["-m", "seed=0,1,2,3,4", "study=kill", "hydra.sweep.dir=outputs/kill", *QUICK]
    sweep = tmp_path / "outputs" / "kill"
    # trial 2 fails, trial 3's process is killed at step 3 (after its step-2 checkpoint): the whole sweep dies
    killed = train(tmp_path, *grid, TUNELAB_FAIL_JOB="2", TUNELAB_KILL_JOB="3", TUNELAB_KILL_STEP="3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert statuses(sweep) == ["finished", "finished", "failed", "running", "pending"]
    untouched = {n: files_of(sweep / n) for n in "012"}

    changed = train(tmp_path, "-m", "seed=0,1,5,3,4", *grid[2:])
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        "error: the grid changed: trial 2 of outputs/kill/ledger.csv ran `seed=2`, this command makes it `seed=5`; "
        "re-run the original command to continue that study, or give a new hydra.sweep.dir"]

    again = train(tmp_path, *grid)
    assert again.returncode == 0, again.stderr[-2000:]
    assert ("study ledger outputs/kill/ledger.csv: 2 skipped (finished), 1 resumed, 0 retried, 1 started, "
            "1 failed left as they are (ledger.retry_failed=true retries them)") in again.stdout
    assert {n: files_of(sweep / n) for n in "012"} == untouched      # not one file rewritten, not even .hydra/
    assert f"Restored all states from the checkpoint at {sweep.resolve()}/3/checkpoints/" in again.stdout + again.stderr
    rows = ledger.read(sweep)
    assert statuses(sweep) == ["finished", "finished", "failed", "finished", "finished"]
    assert (rows[3].attempts, rows[4].attempts) == (2, 1)
    assert rows[3].started < rows[3].ended and float(rows[3].value) > 0

    retried = train(tmp_path, *grid, "ledger.retry_failed=true")
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert "4 skipped (finished), 0 resumed, 1 retried, 0 started" in retried.stdout
    assert statuses(sweep) == ["finished"] * 5 and not (sweep / "2" / "FAILED").exists()


def optuna_trials(sweep: Path, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{sweep}/optuna.db").trials


def test_an_optuna_study_killed_after_three_of_six_trials_continues_to_six(tmp_path):
    search = ["-m", "+sweep=lr_optuna", "hydra.sweeper.n_trials=6", "study=opt", "hydra.sweep.dir=outputs/opt", *QUICK]
    sweep = tmp_path / "outputs" / "opt"
    killed = train(tmp_path, *search, TUNELAB_KILL_JOB="3", TUNELAB_KILL_STEP="3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [t.state.name for t in optuna_trials(sweep, "opt")] == ["COMPLETE"] * 3 + ["RUNNING"]
    untouched = {n: files_of(sweep / n) for n in "012"}

    again = train(tmp_path, *search)
    assert again.returncode == 0, again.stderr[-2000:]
    trials = optuna_trials(sweep, "opt")
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(6)]
    assert {n: files_of(sweep / n) for n in "012"} == untouched
    assert "1 resumed, 0 retried, 2 started" in again.stdout
    assert statuses(sweep) == ["finished"] * 6
    best = min(t.value for t in trials)
    assert f"best_value: {best}" in (sweep / "optimization_results.yaml").read_text()


@pytest.mark.slow   # the same two workers on PostgreSQL run in the default suite
def test_two_workers_on_one_sqlite_study_run_distinct_trials(tmp_path):
    search = ["-m", "+sweep=lr_optuna", "hydra.sweeper.n_trials=4", "study=shared", "hydra.sweep.dir=outputs/shared", *QUICK]
    run_two_workers(tmp_path, search)
    sweep = tmp_path / "outputs" / "shared"
    trials = optuna_trials(sweep, "shared")
    # n_trials counts the study's trials; two asks at the same instant may both pass the count (one extra)
    assert 4 <= len(trials) <= 5 and all(t.state.name == "COMPLETE" for t in trials)
    rows = ledger.read(sweep)
    assert sorted(rows) == [t.number for t in trials]                    # one row and one dir per trial
    assert len({r.pid for r in rows.values()}) == 2                      # both workers ran trials
    assert len({t.params["optimizer.lr"] for t in trials}) == len(trials)  # and drew different values


def run_two_workers(cwd: Path, search: list[str]) -> None:
    cmd = [sys.executable, "-m", "tunelab.cli.train", *search]
    workers = [subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]


def test_two_workers_on_one_postgresql_study_run_distinct_trials(tmp_path):
    """A real PostgreSQL server (Debian's package, started here): the storage a study on several machines uses."""
    import optuna

    from tests.cluster import postgres_server

    with postgres_server() as url:
        search = ["-m", "+sweep=lr_optuna", "hydra.sweeper.n_trials=4", "study=pg", f"hydra.sweeper.storage={url}",
                  "hydra.sweep.dir=outputs/pg", *QUICK]
        run_two_workers(tmp_path, search)
        trials = optuna.load_study(study_name="pg", storage=open_storage(url)).trials
    assert not (tmp_path / "outputs" / "pg" / "optuna.db").exists()     # the study lives in the server
    assert 4 <= len(trials) <= 5 and all(t.state.name == "COMPLETE" for t in trials)
    rows = ledger.read(tmp_path / "outputs" / "pg")
    assert sorted(rows) == [t.number for t in trials]
    assert len({r.pid for r in rows.values()}) == 2
    assert len({t.params["optimizer.lr"] for t in trials}) == len(trials)


def test_workers_that_open_a_new_postgresql_storage_at_once_all_get_it():
    """Each creates the study tables at the same moment; all but one collide (a duplicate type) and try again."""
    from tests.cluster import postgres_server

    script = "import sys; from tunelab.study.storage import open_storage; open_storage(sys.argv[1])"
    with postgres_server() as url:
        procs = [subprocess.Popen([sys.executable, "-c", script, url], env=env(), stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(errors)[-3000:]


def test_a_journal_file_study_is_shared_by_processes_and_survives_them(tmp_path):
    """Optuna's journal file (a shared file system, no server): two processes ask and tell on one study."""
    import optuna

    journal = f"journal:{tmp_path}/shared/optuna.log"
    script = ("import sys, optuna; from tunelab.study.storage import open_storage\n"
              "study = optuna.create_study(study_name='j', storage=open_storage(sys.argv[1]), load_if_exists=True)\n"
              "for _ in range(3):\n"
              "    t = study.ask(); study.tell(t, (t.suggest_float('x', -1, 1) - 0.5) ** 2)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, journal], env=env()) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    trials = optuna.load_study(study_name="j", storage=open_storage(journal)).trials
    assert sorted(t.number for t in trials) == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)


def test_postgresql_urls_get_the_installed_driver():
    from tunelab.study.storage import postgres_driver

    assert postgres_driver("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"   # psycopg 3 here
    assert postgres_driver("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"   # an explicit driver stays
    assert postgres_driver("mysql+pymysql://u@h/db") == "mysql+pymysql://u@h/db"


def test_a_launcher_that_fails_at_launch_leaves_no_pending_trials_and_no_sweep_dir(tmp_path):
    """What `hydra/launcher=slurm` did where submitit could not start: 2 `pending` rows that tunelab-report
    then asked to re-run. Now the trials it never started leave the ledger again, and the empty sweep dir goes."""
    from tunelab.errors import TunelabError
    from tunelab.study.launcher import LedgerLauncher

    class CannotStart:
        def launch(self, job_overrides, initial_job_idx):
            raise RuntimeError('Could not detect "srun", are you indeed on a slurm cluster?')

    sweep = tmp_path / "multirun" / "x"
    launcher = LedgerLauncher(CannotStart(), sweep, retry_failed=False, metric="tuned/test/loss")
    with pytest.raises(TunelabError, match='could not run trials 0-1: RuntimeError: Could not detect "srun"'):
        launcher.launch([["adapter=full"], ["adapter=lora"]], initial_job_idx=0)
    assert not sweep.exists()
    assert "0 started" in launcher.summary()


def test_parallel_launcher_runs_trials_in_worker_processes_with_the_same_ledger(tmp_path):
    result = train(tmp_path, "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "seed=0,1", "study=par",
                   "hydra.sweep.dir=outputs/par", *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = ledger.read(tmp_path / "outputs" / "par")
    assert [r.status for r in rows.values()] == ["finished", "finished"]
    assert len({r.pid for r in rows.values()} | {os.getpid()}) == 3       # two workers, neither the sweep's process


def test_a_wandb_sweep_run_lands_in_the_same_ledger(tmp_path):
    result = train(tmp_path, "study=wandb_sweep", "optimizer.lr=0.001", *QUICK[:-1],
                   WANDB_SWEEP_ID="abc123", WANDB_RUN_ID="run42")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = ledger.read(tmp_path / "outputs" / "wandb_sweep" / "wandb_sweeps" / "abc123")
    (row,) = rows.values()
    assert (row.trial, row.status, row.metric) == (0, "finished", "tuned/test/loss")
    assert "optimizer.lr=0.001" in row.overrides and float(row.value) > 0 and Path(row.run_dir).is_dir()


# --- reports ------------------------------------------------------------------------------------------

@pytest.fixture
def study_with_ledger(tmp_path):
    """A 2 x 2 grid: two trials finished, one running (no result yet), one not started."""
    sweep = tmp_path / "multirun"
    grid = [("full", 0), ("lora", 0), ("full", 1), ("lora", 1)]
    for n, (adapter, seed) in enumerate(grid[:2]):
        fake_run(sweep / str(n), [f"adapter={adapter}", f"seed={seed}"], config(adapter, seed, 1e-3) | {"study": "s1"},
                 {"tuned/test/loss": 1.0 + n, "train/fit_seconds": 3.0, "train/peak_memory_mb": 100.0})
    fake_run(sweep / "2", ["adapter=full", "seed=1"], config("full", 1, 1e-3) | {"study": "s1"})
    for n, (adapter, seed) in enumerate(grid):
        status = {0: "finished", 1: "finished", 2: "running", 3: "pending"}[n]
        ledger.update(sweep, n, status=status, overrides=[f"adapter={adapter}", f"seed={seed}"],
                      run_dir=str(sweep / str(n)))
    return sweep


def test_the_report_shows_pending_and_running_trials_from_the_ledger(study_with_ledger, tmp_path):
    report = build_report([study_with_ledger], out=tmp_path / "report")
    by_run = dict(zip(report.runs.run, report.runs.status))
    assert by_run[str((study_with_ledger / "2").resolve())] == "running"
    assert by_run[str((study_with_ledger / "3").resolve())] == "pending"
    assert report.summary.set_index("group").loc["adapter=full", ["runs", "finished", "incomplete"]].tolist() == [2, 1, 1]
    text = report.markdown_path.read_text()
    assert "| RUNNING |" in text and "| PENDING |" in text


def test_the_wandb_report_object_has_one_runset_per_study_grouped_and_the_expected_panels(study_with_ledger):
    from tunelab.report import compare, load_runs
    from tunelab.report.wandb_report import build_wandb_report

    comparison = compare(load_runs([study_with_ledger]))
    report = build_wandb_report(comparison, ["tuned/test/loss"], "s1 study", project="tunelab", entity="lab")
    grid = report.blocks[-1]
    (runset,) = grid.runsets
    assert (runset.name, runset.entity, runset.project, runset.filters) == ("s1", "lab", "tunelab", "Group = 's1'")
    assert runset.groupby == ["config.adapter.name"]          # the group choice, as W&B records it
    assert [(type(p).__name__, p.title) for p in grid.panels] == [
        ("LinePlot", "train/loss"), ("LinePlot", "val/loss"), ("BarPlot", "tuned/test/loss"),
        ("BarPlot", "train/fit_seconds"), ("BarPlot", "train/tokens_processed"), ("BarPlot", "train/peak_memory_mb")]
    assert {(p.groupby_aggfunc, p.groupby_rangefunc) for p in grid.panels} == {("mean", "stddev")}  # error bars over seeds
    assert report.title == "s1 study" and (report.entity, report.project) == ("lab", "tunelab")
    # (report._to_model(), what save() sends, looks up each runset's project online: not callable here)
