"""tunelab's Optuna sweeper: Optuna's ask/tell loop, each batch of trials run by the launcher Hydra made (basic,
joblib, SLURM, Ray), behind the study ledger.

Why not hydra-optuna-sweeper: its newest release (1.3.0) caps optuna < 3 (so SQLAlchemy < 2), builds the
distributions Optuna 3 removed, and needed patching for everything a study here relies on (its trials numbered
from 0 on every run, a NaN tell that killed the sweep, a grid that raised on a failed last trial). Its loop is
~100 lines; this one, on Optuna 5's public ask/tell, is about as long and patches nothing:

- trials and their dirs are numbered by Optuna trial number; `n_trials` counts the study's trials in all, so a
  re-run, or a second worker on the same storage, asks only for what is missing;
- trials killed mid-run (RUNNING in the storage, their process gone from this machine) run again first, in
  their own dir, from their newest checkpoint;
- a trial that failed, diverged or returned no finite value is told FAIL (never a score); a pruned one PRUNED;
- several objectives (`direction: [minimize, minimize]` with `optimized_metric: [a, b]`) give a Pareto front.

    tunelab-train -m +sweep=lr_optuna                   (conf/sweep/, conf/hydra/sweeper/optuna.yaml)
"""

from __future__ import annotations

import logging
import math
import socket
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


class TrialFailed(TunelabError):
    """A sweep job that failed, diverged or returned no value for the optimized metric."""


def values_of(ret: JobReturn, objectives: int) -> list[float] | None:
    """The job's finite objective values, or None (failed, diverged, NaN, missing, wrong count)."""
    if ret.status != JobStatus.COMPLETED:
        return None
    value = ret._return_value
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return values if len(values) == objectives and all(map(math.isfinite, values)) else None


def directions_of(direction) -> list[str]:
    names = list(direction) if isinstance(direction, (list, tuple, ListConfig)) else [direction]
    for name in names:
        if str(name) not in ("minimize", "maximize"):
            raise TunelabError(f"hydra.sweeper.direction={name}: give minimize or maximize (a list of them for "
                               "several objectives, one per optimized_metric)")
    return [str(n) for n in names]


def check_objectives(metric, directions: list[str]) -> None:
    """One direction per optimized metric (a list of metrics: several objectives)."""
    names = [metric] if metric is None or isinstance(metric, str) else list(metric)
    if len(names) != len(directions):
        raise TunelabError(f"optimized_metric names {len(names)} metric(s) and hydra.sweeper.direction {len(directions)}: "
                           "give one direction per metric, e.g. optimized_metric=[tuned/test/loss,train/tokens_processed] "
                           "hydra.sweeper.direction=[minimize,minimize]")


def reseed_for_trial(sampler, seed: int | None, number: int) -> None:
    """A seeded sampler draws trial N's independent values from seed + N: a resumed search draws what an unbroken
    one would, and two workers on one study do not replay the same random sequence. (Optuna's public
    `reseed_rng()` takes no seed, so the samplers' own random state is set, as `reseed_rng` does.)"""
    if seed is None:
        return
    from optuna.samplers._lazy_random_state import LazyRandomState

    for part in (sampler, getattr(sampler, "_random_sampler", None), getattr(sampler, "_independent_sampler", None)):
        if part is not None and hasattr(part, "_rng"):
            part._rng = LazyRandomState(seed + number)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: DictConfig, direction: Any, storage: Any, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, params: DictConfig | None, pruner: DictConfig | None = None,
                 prune_on: str = "val/loss") -> None:
        self.sampler_cfg, self.directions = sampler, directions_of(direction)
        self.storage_spec, self.study_name, self.n_trials, self.n_jobs = storage, study_name, int(n_trials), int(n_jobs)
        self.max_failure_rate, self.params, self.pruner_cfg, self.prune_on = max_failure_rate, params, pruner, prune_on
        self.seed = sampler.get("seed") if sampler else None
        self.asked: list[int] = []
        self.sweep_dir: Path | None = None   # set by setup (Hydra's); a sweeper used on its own has no run dirs

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        from tunelab.cli.common import die
        from tunelab.study.launcher import check_launcher, wrap

        try:
            check_launcher(config)  # one line, before any sweep dir exists, when the launcher cannot start
            check_objectives(config.get("optimized_metric"), self.directions)
        except TunelabError as err:
            die(str(err), err.exit_code)
        self.config, self.sweep_dir = config, Path(config.hydra.sweep.dir)
        launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                           task_function=task_function)
        self.launcher = wrap(launcher, config, numbering=self.take_numbers)

    def take_numbers(self, count: int) -> list[int]:
        """The trial numbers of the jobs the ledger launcher is handed (it names their dirs by them)."""
        taken, self.asked = self.asked[:count], self.asked[count:]
        return taken

    # --- the study -------------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> None:
        from tunelab.cli.common import die

        try:
            self.search(arguments)
        except TunelabError as err:
            die(str(err), err.exit_code)
        finally:
            if hasattr(self.launcher, "summary"):
                print(self.launcher.summary(), flush=True)

    def search(self, arguments: list[str]) -> None:
        from hydra_plugins.tunelab_sweeper.search_space import search_space

        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        space, fixed = search_space(params + list(arguments))
        study = self.create_study(space)
        self.resume_killed(study)
        failures = 0
        while (batch := self.ask(study, space)):
            overrides = [[*(f"{k}={v}" for k, v in trial.params.items()), *(f"{k}={v}" for k, v in fixed.items())]
                         for trial in batch]
            self.asked += [trial.number for trial in batch]
            returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
            failures += sum(self.tell(study, trial.number, ret) is False for trial, ret in zip(batch, returns))
            if failures > self.max_failure_rate * self.n_trials:
                raise TrialFailed(f"{failures} trials failed, more than hydra.sweeper.max_failure_rate="
                                  f"{self.max_failure_rate} of {self.n_trials}; see the FAILED files in {self.sweep_dir}")
        write_results(study, self.sweep_dir, self.directions)

    def create_study(self, space: dict):
        import optuna
        from hydra.utils import instantiate

        from hydra_plugins.tunelab_sweeper.search_space import grid_of
        from tunelab.study.storage import open_storage

        if self.pruner_cfg and len(self.directions) > 1:
            raise TunelabError("Optuna cannot prune a search with several objectives: drop hydra/sweeper/pruner "
                               "(hydra/sweeper/pruner=none) or optimize one metric")
        if self.pruner_cfg and not self.storage_spec:
            raise TunelabError("pruning needs a storage the trials can report to: set hydra.sweeper.storage "
                               "(e.g. sqlite:///${hydra.sweep.dir}/optuna.db)")
        extra = {}
        if str(self.sampler_cfg.get("_target_", "")).endswith("GridSampler"):
            extra["search_space"] = grid_of(space)
            total = math.prod(len(v) for v in extra["search_space"].values())
            self.n_trials = min(self.n_trials, total)  # the grid's size caps the study
        sampler = instantiate(self.sampler_cfg, **extra)
        pruner = instantiate(self.pruner_cfg) if self.pruner_cfg else None
        study = optuna.create_study(study_name=self.study_name, storage=open_storage(self.storage_spec),
                                    sampler=sampler, pruner=pruner, directions=self.directions, load_if_exists=True)
        log.info("study %s in %s, sampler %s, directions %s", study.study_name, self.storage_spec or "memory",
                 type(sampler).__name__, self.directions)
        return study

    def ask(self, study, space: dict) -> list:
        """Up to n_jobs new trials, as many as the study still lacks (its trials from every run and worker)."""
        from hydra_plugins.tunelab_sweeper.search_space import suggest

        missing = self.n_trials - len(study.get_trials(deepcopy=False))
        batch = []
        for _ in range(max(0, min(self.n_jobs, missing))):
            trial = study.ask()
            reseed_for_trial(study.sampler, self.seed, trial.number)
            for key, dist in space.items():
                suggest(trial, key, dist)
            batch.append(trial)
        return batch

    def tell(self, study, number: int, ret: JobReturn) -> bool | None:
        """COMPLETE with its values, PRUNED, or FAIL. True: a result; None: pruned; False: failed."""
        import optuna
        from optuna.trial import TrialState

        from tunelab.study.pruning import is_pruned

        values, run_dir = values_of(ret, len(self.directions)), self.run_dir_of(number)
        if is_pruned(run_dir):
            state, values, outcome = TrialState.PRUNED, None, None
        elif values is None:
            log.warning("trial %d failed, diverged or returned no finite value: told to Optuna as FAIL (see FAILED / "
                        "metrics.json in %s)", number, run_dir)
            state, outcome = TrialState.FAIL, False
        else:
            state, outcome = TrialState.COMPLETE, True
        try:
            study.tell(number, values, state=state, skip_if_finished=True)
        except RuntimeError as err:  # GridSampler stops the study when its grid is used up: nothing to stop here
            if "Study.stop" not in str(err):
                raise
        except (ValueError, optuna.exceptions.OptunaError) as err:
            log.warning("trial %d could not be told to Optuna: %s", number, err)
        return outcome

    def run_dir_of(self, number: int) -> Path | None:
        """Where trial `number` ran: the ledger's word, else the sweep dir's job subdir (hydra.sweep.subdir)."""
        from tunelab.study import ledger

        if self.sweep_dir is None:
            return None
        row = ledger.read(self.sweep_dir).get(number)
        return Path(row.run_dir) if row and row.run_dir else self.sweep_dir / str(number)

    def resume_killed(self, study) -> None:
        """Trials still RUNNING in the storage whose process on this machine is gone: run again in their own dir
        (from their newest checkpoint), then told to Optuna. A live worker's trials are left to it."""
        from optuna.trial import TrialState

        from tunelab.study import ledger
        from tunelab.study.ledger import INTERRUPTED, RUNNING

        if not hasattr(self.launcher, "sweep_dir"):
            return
        rows = ledger.read(self.sweep_dir)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            row = rows.get(trial.number)
            if row and row.status in (RUNNING, INTERRUPTED) and not row.is_live() and row.host in ("", socket.gethostname()):
                self.asked.append(trial.number)
                ret = self.launcher.launch([row.overrides], initial_job_idx=trial.number)[0]
                self.tell(study, trial.number, ret)


def write_results(study, sweep_dir: Path, directions: list[str]) -> None:
    """optimization_results.yaml: the best trial, or with several objectives the Pareto front."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise TrialFailed("every trial of the sweep failed, diverged or was pruned; see the FAILED files in the "
                          "sweep dir (try a smaller learning-rate range)")
    if len(directions) == 1:
        best = study.best_trial
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s", best.value)
        result = {"name": "optuna", "best_trial": best.number, "best_params": best.params, "best_value": best.value}
    else:
        front = sorted(study.best_trials, key=lambda t: t.number)
        log.info("Pareto front: trials %s", [t.number for t in front])
        result = {"name": "optuna", "directions": directions,
                  "best_trials": [{"number": t.number, "params": t.params, "values": t.values} for t in front]}
    OmegaConf.save(OmegaConf.create(result), sweep_dir / "optimization_results.yaml")
