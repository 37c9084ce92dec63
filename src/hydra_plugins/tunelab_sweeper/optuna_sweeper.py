"""The Optuna sweeper, with failed and diverged trials told to Optuna as FAIL (and a grid whose last
trial fails still ending cleanly), and searches that survive a kill and share a study.

hydra-optuna-sweeper 1.3 (the newest release; 1.4.0rc3 needs hydra-core 1.4 rc) numbers jobs from 0 in
every run and asks n_trials more each time, so a re-run wrote its trials over the first run's dirs. Here
job dirs are named by Optuna trial number, `n_trials` counts the study's trials in all (a re-run and a
second worker ask only what is missing), trials killed mid-run (RUNNING in the storage, their process gone
from this machine) are resumed from their checkpoint first, and every trial has its row in the ledger.
These wrap the plugin (its `study.ask` and launcher) rather than copy its 150-line `sweep`.

hydra-optuna-sweeper 1.3 hands each job's return value to `study.tell`. A NaN (what a failed or
diverged tunelab job returns) makes optuna raise, the sweeper then tells FAIL *with* the value, which
raises again: the whole sweep dies on its first bad trial. Here a job that returned no finite number is
turned into a failed job before the sweeper sees it, so it is recorded as FAIL (never as a score) and
the search goes on (`max_failure_rate` still decides how many failures end it).

    defaults: [override /hydra/sweeper: optuna]
    hydra: {sweeper: {_target_: hydra_plugins.tunelab_sweeper.optuna_sweeper.OptunaSweeper, ...}}
"""

from __future__ import annotations

import logging
import math
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


class TrialFailed(TunelabError):
    """A sweep job that failed, diverged or returned no value for the optimized metric."""


def is_finite_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class NonFiniteFails(Launcher):
    """Wraps a launcher: a completed job whose return value is not a finite number becomes a failed job."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    def setup(self, **kwargs) -> None:
        self.launcher.setup(**kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns = self.launcher.launch(job_overrides, initial_job_idx)
        for ret, overrides in zip(returns, job_overrides):
            if ret.status == JobStatus.COMPLETED and not is_finite_number(ret._return_value):
                message = (f"trial {' '.join(overrides)} returned {ret._return_value!r}: failed or diverged "
                           f"(see FAILED / metrics.json in {ret.working_dir or 'its run dir'})")
                log.warning(message)
                ret.status, ret._return_value = JobStatus.FAILED, TrialFailed(message)
        return returns


@contextmanager
def grid_exhaustion_tolerated():
    """GridSampler calls `study.stop()` once the grid is used up, which raises outside `optimize()`; the
    plugin (ask/tell) excuses that only for a COMPLETE trial, so a grid whose last trial fails kills the
    sweep. The sweeper already caps n_trials at the grid size, so that stop has nothing to stop."""
    from optuna.samplers import GridSampler  # here, not at the top: Hydra imports this module on every start

    original = GridSampler.after_trial

    def after_trial(self, study, trial, state, values):
        try:
            original(self, study, trial, state, values)
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise

    GridSampler.after_trial = after_trial
    try:
        yield
    finally:
        GridSampler.after_trial = original


try:  # the `sweeps` extra; without it there is simply no Optuna sweeper to offer (and no warning)
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginOptunaSweeper
except ImportError:
    PluginOptunaSweeper = None

class SearchComplete(Exception):
    """The study holds hydra.sweeper.n_trials trials (from this worker, earlier runs or other workers)."""


def reseed_for_trial(sampler, seed: int | None, number: int) -> None:
    """A seeded sampler draws trial N from seed + N: a resumed search draws what an unbroken one would, and two
    workers on one study do not draw the same values (each would replay the same random sequence)."""
    if seed is None:
        return
    import numpy as np

    for part in (sampler, getattr(sampler, "_random_sampler", None)):
        if part is not None and hasattr(part, "_rng"):
            part._rng = np.random.RandomState(seed + number)


def sqlite_storage(url):
    """SQLite with a long lock timeout: workers on one machine wait for each other's writes, not fail."""
    if not isinstance(url, str) or not url.startswith("sqlite:///"):
        return url
    import optuna

    import fcntl

    path = Path(url[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    # workers started together on a new study would all create its tables at once: one at a time
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 300}})


if PluginOptunaSweeper is not None:
    class OptunaSweeper(PluginOptunaSweeper):
        """Also: trials are numbered (and their dirs named) by Optuna trial number, a study continues from its
        storage up to n_trials in all, trials killed mid-run resume first, and every trial is in the ledger."""

        def setup(self, *, hydra_context, task_function, config) -> None:
            from tunelab.study.launcher import wrap

            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            self.asked: list[int] = []
            self.ledger_launcher = wrap(self.sweeper.launcher, config, numbering=self.take_numbers)
            self.sweeper.launcher = NonFiniteFails(self.ledger_launcher)
            self.seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed")

        def take_numbers(self, count: int) -> list[int]:
            taken, self.asked = self.asked[:count], self.asked[count:]
            return taken

        def sweep(self, arguments: list[str]) -> None:
            import optuna

            self.sweeper.storage = sqlite_storage(self.sweeper.storage)
            create_study = optuna.create_study
            optuna.create_study = lambda *a, **k: self.continued(create_study(*a, **k))
            try:
                with grid_exhaustion_tolerated():
                    super().sweep(arguments)
            except SearchComplete:
                write_results(self.study, self.sweeper.config.hydra.sweep.dir)
            except ValueError as err:
                if "No trials are completed yet" in str(err):  # optuna's words when every trial failed
                    raise TrialFailed("every trial of the sweep failed or diverged; see the FAILED files in the "
                                      "sweep dir, and try a smaller learning-rate range") from None
                raise
            finally:
                optuna.create_study = create_study
                if hasattr(self.ledger_launcher, "summary"):
                    print(self.ledger_launcher.summary(), flush=True)

        def continued(self, study):
            """The study the plugin asks from: its killed trials resumed first, then asked up to n_trials in all."""
            self.study, ask = study, study.ask
            self.resume_killed(study)

            def ask_numbered(*args, **kwargs):
                if len(study.get_trials(deepcopy=False)) >= self.sweeper.n_trials:
                    raise SearchComplete()
                trial = ask(*args, **kwargs)
                reseed_for_trial(study.sampler, self.seed, trial.number)
                self.asked.append(trial.number)
                return trial

            study.ask = ask_numbered
            return study

        def resume_killed(self, study) -> None:
            """Trials still RUNNING in the storage whose process on this machine is gone: run again in their own
            dir (from their newest checkpoint) and told to Optuna. A live worker's trials are left to it."""
            import optuna

            from tunelab.study import ledger
            from tunelab.study.ledger import INTERRUPTED, RUNNING

            if not hasattr(self.ledger_launcher, "sweep_dir"):
                return
            rows = ledger.read(self.ledger_launcher.sweep_dir)
            killed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                      if t.number in rows and rows[t.number].status in (RUNNING, INTERRUPTED) and not rows[t.number].is_live()
                      and rows[t.number].host in ("", socket.gethostname())]
            for trial in killed:
                self.asked.append(trial.number)
                ret = self.sweeper.launcher.launch([rows[trial.number].overrides], initial_job_idx=trial.number)[0]
                if ret.status == JobStatus.COMPLETED:
                    study.tell(trial.number, float(ret.return_value))
                else:
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def write_results(study, sweep_dir: str) -> None:
    """optimization_results.yaml, as the plugin writes it after its own loop (which SearchComplete ended)."""
    best = study.best_trial
    log.info(f"Best parameters: {best.params}")
    log.info(f"Best value: {best.value}")
    OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
                   f"{sweep_dir}/optimization_results.yaml")
