"""`hydra/launcher=slurm`: each trial one task of a SLURM job array, submitted by submitit (hydra-submitit-launcher's
launcher), waited for by tunelab.

hydra-submitit-launcher waits with `[job.results()[0] for job in jobs]`: the first trial that died without a result
(`scancel`, a lost node, the OOM killer) raises out of the sweep, while the trials after it go on running with nobody
to record them; and submitit tells a dead job from a running one through `sacct`, so on a cluster without
accounting it waits forever for a cancelled trial. Here every trial is waited for through `squeue` (which every
SLURM has); one that left the queue without a result comes back as a failed job, so the sweep records it and goes
on, and a re-run of the same command resumes it from its checkpoint. A requeued trial (`scontrol requeue`, or
Lightning's own requeue on SLURM's time-limit signal) is back in the queue under the same id, and is waited for.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "TIMEOUT", "SPECIAL_EXIT")


class TrialLost(TunelabError):
    """A SLURM job that ended without returning a result (the sweep's exit says so in one line)."""

    exit_code = 1


def queue_state(job_id: str) -> str | None:
    """The job's state as squeue says it (ended jobs stay listed for MinJobAge); None once it is gone."""
    done = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    states = done.stdout.split() if done.returncode == 0 else []
    return states[0] if states else None


class SlurmLauncher(SubmititSlurmLauncher):
    def __init__(self, poll_seconds: float = 5.0, grace_seconds: float = 30.0, **params: Any) -> None:
        super().__init__(**params)
        self.poll_seconds, self.grace_seconds = poll_seconds, grace_seconds

    def executor(self):
        """submitit's executor with the launcher's parameters, as hydra-submitit-launcher builds it."""
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and len(job_overrides) > 0
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = self.executor().map_array(self, *zip(*job_params))
        return [self.settle(job, overrides, number)
                for number, (job, overrides) in enumerate(zip(jobs, job_overrides), start=initial_job_idx)]

    def settle(self, job, overrides: Sequence[str], number: int) -> JobReturn:
        """The job's JobReturn once it ended; a failed one when it left the queue without a result."""
        ended_at = None
        while not job.paths.result_pickle.exists():
            state = queue_state(job.job_id)
            if state is None or state.split()[0] in ENDED:
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > self.grace_seconds:  # a shared file system may show it late
                    message = (f"trial {number} (SLURM job {job.job_id}) ended ({state or 'gone from the queue'}) without a "
                               "result; re-run the same command to resume it from its checkpoint")
                    log.warning(message)
                    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=TrialLost(message),
                                     task_name="tunelab")
            else:
                ended_at = None   # pending, running, or requeued: wait
            time.sleep(self.poll_seconds)
        return job.results()[0]
