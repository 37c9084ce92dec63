"""One job of a Hydra multirun: labelled by what the sweep varies, and isolated from the jobs around it.

Three things go wrong when Lightning's DDP runs inside a Hydra sweep, all handled here:
- Lightning starts ranks > 0 by re-running `sys.argv` (lightning_fabric `_hydra_subprocess_cmd`); with
  `-m adapter=full,lora` every child would launch the whole sweep again, into new dirs. The children get
  this job's own overrides instead, without `-m`, and this job's dir as `hydra.run.dir`.
- The launcher leaves LOCAL_RANK/MASTER_PORT/WORLD_SIZE in os.environ and the process group open; the
  next job then believes its processes are created externally and waits for a rank that never comes.
  Both are undone when a job ends.
- W&B: every job of a sweep shares `study` (the group); the varying overrides become tags and part of
  the run name, so the W&B table says which job is which.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from tunelab.errors import TunelabError

# argv options of a Hydra app that take a value and must reach the DDP children unchanged
VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")
MULTIRUN_FLAGS = ("-m", "--multirun")


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def swept_keys(argv: list[str], sweeper_params: dict | None) -> list[str]:
    """Keys the sweep varies: comma lists / ranges / choices on the command line, plus the sweeper's params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in argv if not a.startswith("-") and "=" in a]
    parsed = OverridesParser.create().parse_overrides(candidates)
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return list(dict.fromkeys([*keys, *(sweeper_params or {})]))


def sweep_arguments(hydra_cfg) -> list[str]:
    """The sweep's own overrides (`adapter=full,lora`), as the sweeper recorded them in multirun.yaml;
    the command line when that file is not there (a launcher that runs jobs elsewhere reads it too)."""
    recorded = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if recorded.is_file():
        overrides = OmegaConf.load(recorded).hydra.overrides.get("task")
        if overrides is not None:
            return list(overrides)
    return sys.argv[1:]


def job_label(task_overrides: list[str], keys: list[str]) -> list[str]:
    """This job's value of every swept key, as `key=value` (its W&B tags)."""
    by_key = {override_key(o): o.lstrip("+~") for o in task_overrides}
    return [by_key[k] for k in keys if k in by_key]


def label_job(cfg: DictConfig, labels: list[str]) -> None:
    if not labels:
        return
    with open_dict(cfg):
        cfg.tags = list(dict.fromkeys([*(cfg.get("tags") or []), *labels]))
        cfg.run_name = f"{cfg.run_name}-" + "-".join(label.replace("/", "_") for label in labels)


def child_argv(argv: list[str], task_overrides: list[str]) -> list[str]:
    """The command line of this one job: the app's own flags, no `-m`, the job's concrete overrides."""
    kept, rest = [argv[0]], iter(argv[1:])
    for arg in rest:
        if arg in VALUE_FLAGS:
            kept += [arg, next(rest, "")]
        elif arg.startswith("--") and "=" in arg and arg.split("=")[0] in VALUE_FLAGS:
            kept.append(arg)
    return kept + list(task_overrides)


@contextmanager
def sweep_job(cfg: DictConfig):
    """Within a multirun: label the job, point DDP children at it, and clean up after it."""
    if not is_multirun():
        yield
        return
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    task = list(hydra_cfg.overrides.task)
    params = hydra_cfg.sweeper.get("params") if "sweeper" in hydra_cfg else None
    label_job(cfg, job_label(task, swept_keys(sweep_arguments(hydra_cfg), params)))
    saved_env, saved_argv = dict(os.environ), list(sys.argv)
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # what Lightning gives the children as hydra.run.dir
    sys.argv = child_argv(saved_argv, task)
    try:
        yield
    finally:
        end_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv


def end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sweep_value(value) -> float:
    """What a job returns to the sweeper: NaN for a missing or non-finite metric (failed, diverged)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def optimized_value(metrics: dict, name, strict: bool) -> float | list[float] | None:
    """The value a sweeper optimizes (a list of them when optimized_metric names several objectives). In a sweep,
    a name the run does not produce is a config mistake, said plainly (a single run only warns: it returns to no
    one). Ranks > 0 return no metrics."""
    if not name or not metrics:
        return None
    names = [name] if isinstance(name, str) else [str(n) for n in name]
    missing = [n for n in names if n not in metrics]
    if missing:
        message = (f"optimized_metric={missing[0]} is not among the metrics this run returns "
                   f"({', '.join(sorted(metrics))}); set optimized_metric to one of them")
        if strict:
            raise TunelabError(message)
        logging.getLogger("tunelab").warning(message)
        return None
    values = [sweep_value(metrics[n]) for n in names]
    return values[0] if isinstance(name, str) else values
