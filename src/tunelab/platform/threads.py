"""CPU threads follow the machine: `runtime.threads=auto` is this machine's cores divided by the jobs the launcher
runs at once on it, so two trials side by side on 2 cores run a thread each instead of two each.

Nothing set the thread count before: torch takes every core in every process, so `hydra/launcher=parallel
hydra.launcher.n_jobs=2` on 2 cores ran 2 x 2 threads, measured 5-25x slower than one job alone (issue 23).
`auto` never raises the count above what torch would use on its own (OMP_NUM_THREADS, a test's one thread); an
explicit `runtime.threads=N` always wins. Inter-op threads (the pool torch runs independent ops on) are set to the
same number where torch still allows it (only before its first parallel work), so they do not oversubscribe either.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, open_dict

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")
AUTO = "auto"


@dataclass(frozen=True)
class Threads:
    count: int
    reason: str


def machine_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, SLURM, cpusets), capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def jobs_at_once(hydra=None) -> tuple[int, str]:
    """How many jobs the launcher runs at once on this machine, and which setting says so (1 outside a multirun).
    hydra: Hydra's runtime config (default: this job's)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hydra = hydra if hydra is not None else HydraConfig.get()
        launcher = hydra.launcher
    except (ValueError, AttributeError):  # composed without Hydra's runtime (tests, tunelab-verify)
        return 1, ""
    if "MULTIRUN" not in str(hydra.get("mode")) or "joblib" not in str(launcher.get("_target_", "")):
        return 1, ""
    n_jobs = int(launcher.get("n_jobs") or 1)
    if n_jobs < 0:  # joblib: -1 is one job per core, -2 all but one, ...
        n_jobs = max(1, os.cpu_count() + 1 + n_jobs)
    return n_jobs, "hydra.launcher.n_jobs"


def resolve_threads(requested) -> Threads:
    requested = AUTO if requested is None else requested
    if str(requested) != AUTO:
        try:
            count = int(requested)
        except (TypeError, ValueError):
            count = 0
        if count < 1:
            raise TunelabError(f"runtime.threads={requested} must be auto or an integer >= 1 (e.g. runtime.threads=2)")
        return Threads(count, "set explicitly")
    cores, (jobs, setting) = machine_cores(), jobs_at_once()
    share = max(1, cores // jobs)
    own = torch.get_num_threads()  # what torch takes by itself: every core, or OMP_NUM_THREADS
    count = min(share, own)
    why = f"{cores} cores / {jobs} jobs at once ({setting})" if setting else f"{cores} cores, one job"
    if own < share:
        why += f", capped at the {own} torch was given (OMP_NUM_THREADS or the caller)"
    return Threads(count, why)


def apply_threads(cfg: DictConfig) -> Threads:
    """Set torch's intra-op (and, while it still may, inter-op) threads from runtime.threads; the concrete count is
    written into the config so resolved_config.yaml and provenance.json record what ran."""
    runtime = cfg.get("runtime")
    threads = resolve_threads(runtime.get("threads", AUTO) if runtime is not None else AUTO)
    torch.set_num_threads(threads.count)
    try:
        torch.set_num_interop_threads(threads.count)
    except RuntimeError:  # torch allows it once, before any inter-op work: a second run in this process keeps it
        pass
    if runtime is not None:
        with open_dict(cfg):
            runtime.threads = threads.count
    log.info("threads: %d (%s)", threads.count, threads.reason)
    return threads
