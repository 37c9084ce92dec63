"""`hydra/launcher=ray`: each trial of a sweep as a Ray task with its own resources (`hydra.launcher.remote`:
num_cpus, num_gpus, memory, ...), on a Ray cluster (`hydra.launcher.init.address`) or a Ray instance this process
starts (address null). Every trial records itself in the study ledger, as with any launcher.

A thin launcher on Ray's own API rather than hydra-ray-launcher 1.2.2: that plugin pulls boto3 and an AWS
launcher, and waits with `ray.get` on all trials at once, so the first failed trial ends the sweep while the
others run on unrecorded. Here each trial is awaited on its own and one that Ray lost (its worker killed, its node
gone) comes back as a failed job: the sweep goes on, and a re-run resumes that trial from its checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


def run_trial(hydra_context, task_function, config, job_num: int, singleton_state: dict, cwd: str) -> JobReturn:
    """One trial, inside a Ray worker: Hydra's run_job in the trial's own dir (hydra.sweep.dir/subdir), from the
    sweep's working dir (a worker of `ray start` starts elsewhere; relative paths, the sweep dir's included, mean
    what they mean to the sweep: the same checkout at the same path on every machine, as with SLURM)."""
    import ray

    Singleton.set_state(singleton_state)
    setup_globals()
    with open_dict(config.hydra.job):
        config.hydra.job.id = ray.get_runtime_context().get_task_id()
        config.hydra.job.num = job_num
    before = os.getcwd()
    os.chdir(cwd)
    try:
        return run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    finally:
        os.chdir(before)  # Ray reuses its workers


class RayLauncher(Launcher):
    def __init__(self, init: Any = None, remote: Any = None) -> None:
        self.init = OmegaConf.to_container(init, resolve=True) if OmegaConf.is_config(init) else dict(init or {})
        self.remote = OmegaConf.to_container(remote, resolve=True) if OmegaConf.is_config(remote) else dict(remote or {})
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        if not ray.is_initialized():  # unset options are left out: Ray refuses some when joining a cluster
            ray.init(**{k: v for k, v in self.init.items() if v is not None})
        trial = ray.remote(**self.remote)(run_trial)
        refs = []
        for number, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            refs.append(trial.remote(self.hydra_context, self.task_function, config, number, Singleton.get_state(),
                                     os.getcwd()))
        return [self.result(ref, overrides) for ref, overrides in zip(refs, job_overrides)]

    @staticmethod
    def result(ref, overrides: Sequence[str]) -> JobReturn:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as err:  # the task itself failed or was lost, not the trial's code
            log.warning("%s: Ray lost this trial: %s", " ".join(overrides), err)
            return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=err, task_name="tunelab")
