"""A job config as the CLI composes it, for callers that run a job in-process (tunelab-verify, the tests)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict


def compose_job(config: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """The job config `tunelab-<config> OVERRIDES` would run, with its run dir set to `run_dir` and Hydra's
    runtime set up, so `${hydra:...}` interpolations resolve as in a real run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from tunelab.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.paths.run_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
