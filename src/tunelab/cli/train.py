"""`tunelab-train`: compose a run from config groups and overrides, train, evaluate, export."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tunelab.cli.common import die, named_run_dir, preflight, quiet_libraries, user_error
from tunelab.errors import TunelabError
from tunelab.paths import CONF_DIR

log = logging.getLogger("tunelab")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_entry(cfg: DictConfig) -> float | None:
    from tunelab.study.multirun import sweep_job
    from tunelab.study.trial import recorded_trial

    # multirun: W&B tags/name from the swept values; DDP children run this job only; the ledger's row
    with sweep_job(cfg), recorded_trial(cfg) as trial:
        value = run_job(cfg)
        if trial is not None:
            trial.value = value
        return value


def run_job(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from tunelab.run import rundir
    from tunelab.run.interrupts import RunInterrupted
    from tunelab.run.lock import RunDirInUse
    from tunelab.run.train import train
    from tunelab.study.multirun import optimized_value

    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        try:
            return optimized_value(train(cfg), cfg.get("optimized_metric"), strict=multirun)
        except Exception as err:
            raise user_error(err) or err
    except RunDirInUse as err:  # another run's dir: not a file of it is touched
        if multirun:
            log.error("run refused: %s", err)
            return float("nan")
        die(str(err), err.exit_code)
    except RunInterrupted as err:
        err.message = rundir.with_resume_hint(err.message, Path(cfg.paths.run_dir))  # e.g. killed while evaluating
        rundir.mark_failed(Path(cfg.paths.run_dir), err.message)
        print(err.message, file=sys.stderr)
        raise
    except TunelabError as err:
        rundir.mark_failed(Path(cfg.paths.run_dir), str(err))
        if multirun:  # the sweep goes on; this job is reported as failed
            log.error("run failed: %s", err)
            return float("nan")
        die(str(err), err.exit_code)
    except BaseException as err:
        rundir.mark_failed(Path(cfg.paths.run_dir), f"{type(err).__name__}: {err}")
        raise


def main() -> None:
    from tunelab.run.provenance import report_reproduction, take_reproduce_arg
    from tunelab.run.resume import take_run_dir_args

    from tunelab.run import lock

    quiet_libraries()
    with ExitStack() as held:
        try:
            reproducing = take_reproduce_arg(sys.argv)  # reproduce=RUN_DIR: its recorded overrides, a fresh dir
            run_dir = named_run_dir(sys.argv[1:])
            lock.refuse_if_in_use(run_dir)  # a dir another run holds: refused before anything reads it
            take_run_dir_args(sys.argv)  # a resume gets the run's own overrides; an occupied dir is refused untouched
            preflight(sys.argv[1:], "train")
            held.enter_context(lock.holding(run_dir))  # before Hydra writes .hydra/ and train.log into it
        except TunelabError as err:
            die(str(err), err.exit_code)
        hydra_entry()
    if reproducing and not report_reproduction(*reproducing):
        sys.exit(1)


if __name__ == "__main__":
    main()
