"""The Optuna sweeper, with failed and diverged trials told to Optuna as FAIL (and a grid whose last
trial fails still ending cleanly).

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
from contextlib import contextmanager
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

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

if PluginOptunaSweeper is not None:
    class OptunaSweeper(PluginOptunaSweeper):
        def setup(self, *, hydra_context, task_function, config) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            self.sweeper.launcher = NonFiniteFails(self.sweeper.launcher)

        def sweep(self, arguments: list[str]) -> None:
            try:
                with grid_exhaustion_tolerated():
                    return super().sweep(arguments)
            except ValueError as err:
                if "No trials are completed yet" in str(err):  # optuna's words when every trial failed
                    raise TrialFailed("every trial of the sweep failed or diverged; see the FAILED files in the "
                                      "sweep dir, and try a smaller learning-rate range") from None
                raise
