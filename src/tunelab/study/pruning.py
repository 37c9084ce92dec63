"""Pruning: a trial of an Optuna search reports the validation metric Lightning logs to its Optuna trial, and stops
training when the study's pruner says it is worse than the trials before it at the same step.

The sweeper adds this callback to each trial's config (tunelab.study.trial) when `hydra.sweeper.pruner` is set.
A pruned trial stops at that validation, is still evaluated (its test metrics say how far it got), leaves
`PRUNED` in its run dir, is `pruned` in the ledger and the report, and is told to Optuna as PRUNED (its last
reported value is what the pruner compares). Optuna's own PyTorchLightningPruningCallback raises TrialPruned out
of `fit` instead, which here would lose the evaluation and end the run as failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pytorch_lightning import Callback

log = logging.getLogger("tunelab")

MARKER = "PRUNED"


def is_pruned(run_dir: str | Path | None) -> bool:
    return bool(run_dir) and (Path(run_dir) / MARKER).is_file()


class OptunaPruning(Callback):
    def __init__(self, storage: str, study_name: str, trial: int, pruner, monitor: str = "val/loss",
                 run_dir: str = ".") -> None:
        self.storage, self.study_name, self.number, self.monitor = storage, study_name, trial, monitor
        self.pruner, self.run_dir = pruner, Path(run_dir)
        self._trial = None

    def trial(self):
        """The Optuna trial this run is (opened on first use: rank 0 only, after the sanity check)."""
        if self._trial is None:
            import optuna
            from hydra.utils import instantiate

            from tunelab.study.storage import open_storage

            # the sweeper's pruner (a study's storage keeps none: load_study would use a default one); Hydra has
            # built it already when this callback came from the config
            pruner = self.pruner if isinstance(self.pruner, optuna.pruners.BasePruner) else instantiate(self.pruner)
            study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage), pruner=pruner)
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, self.number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            prune = self.report(trainer.callback_metrics.get(self.monitor), trainer.global_step)
        # every rank stops together, as Lightning's EarlyStopping does
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True

    def report(self, value, step: int) -> bool:
        if value is None:
            log.warning("pruning: no %s logged at step %d; set hydra.sweeper.prune_on to a metric the run logs "
                        "during validation", self.monitor, step)
            return False
        value = float(value)
        trial = self.trial()
        trial.report(value, step)  # NaN too: the pruners prune a trial whose metric is NaN
        if not trial.should_prune():
            return False
        log.info("pruning: trial %d stops at step %d (%s=%.4g is worse than the pruner allows)",
                 self.number, step, self.monitor, value)
        (self.run_dir / MARKER).write_text(f"step {step}: {self.monitor}={value!r}\n")
        return True
