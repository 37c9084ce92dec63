"""What a composed config needs beyond tunelab's own dependencies, checked before anything slow or lasting.

A logger, launcher, adapter or evaluation that rests on an optional package is named by its `_target_`; the
pre-flight walks every `_target_` of the config (Hydra's launcher included) and refuses, in one line with the
install command, one whose package is missing, before a model loads or a run dir is made. Without it,
`logger=mlflow` failed after the model loaded and the base model was evaluated, in Hydra's multi-line error.
Every `_target_` itself must resolve too: a misspelt reward class is one line now, not at the first rollout.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class Needs:
    target: str                       # a `_target_`, or the module prefix of the targets, that needs it
    modules: tuple[str, ...]          # importable names; one of them is enough
    install: str                      # the command that installs it
    choice: str                       # how a user asks for it
    ready: Callable[[], str | None] | None = None  # installed but unusable here: why (None: usable)


def slurm_unreachable() -> str | None:
    """submitit submits with sbatch; sinfo answering is the cheapest sign that a SLURM controller does."""
    if shutil.which("sbatch") is None:
        return ("sbatch is not on PATH (no SLURM here: run on the cluster's login node, or start a one-machine "
                "cluster with `bash scripts/setup_slurm.sh` as root)")
    try:
        answer = subprocess.run(["sinfo", "--noheader", "--summarize"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo did not answer ({type(err).__name__})"
    if answer.returncode != 0:
        lines = (answer.stderr or answer.stdout).strip().splitlines()
        return f"no SLURM controller answers (sinfo: {lines[-1] if lines else f'exit {answer.returncode}'})"
    return None


SUBMITIT = "pip install 'hydra-submitit-launcher>=1.2,<1.3'"
OPTIONAL = (
    Needs("pytorch_lightning.loggers.MLFlowLogger", ("mlflow",), "pip install mlflow", "logger=mlflow"),
    Needs("pytorch_lightning.loggers.TensorBoardLogger", ("tensorboard", "tensorboardX"), "pip install tensorboard",
          "logger=tensorboard"),
    Needs("hydra_plugins.tunelab_sweeper.slurm_launcher.SlurmLauncher", ("submitit",), SUBMITIT,
          "hydra/launcher=slurm", slurm_unreachable),
    Needs("hydra_plugins.hydra_submitit_launcher", ("submitit",), SUBMITIT, "hydra/launcher=local_processes"),
    Needs("hydra_plugins.tunelab_sweeper.ray_launcher.RayLauncher", ("ray",), "pip install 'ray>=2.40,<3'",
          "hydra/launcher=ray"),
    Needs("hydra_plugins.hydra_joblib_launcher", ("joblib",), "pip install 'hydra-joblib-launcher>=1.2,<1.3'",
          "hydra/launcher=parallel"),
    Needs("hydra_plugins.tunelab_sweeper.optuna_sweeper.OptunaSweeper", ("optuna",), "pip install 'optuna>=5,<6'",
          "hydra/sweeper=optuna"),
    Needs("tunelab.models.adapters.qlora", ("bitsandbytes",), "pip install 'bitsandbytes>=0.45'", "adapter=qlora"),
    Needs("tunelab.eval.harness", ("lm_eval",), "pip install 'lm-eval>=0.4.13,<0.5'", "eval=lm_eval"),
    Needs("vllm", ("vllm",), "pip install vllm (in its own environment: see the README)", "a vLLM backend"),
)
# Hydra plugin configs a launcher config builds on: absent when the plugin is not installed, so Hydra's
# "Could not load 'hydra/launcher/ray'" gets the install command.
PLUGIN_CONFIGS = {
    "hydra/launcher/submitit_slurm": OPTIONAL[2],
    "hydra/launcher/submitit_local": OPTIONAL[3],
    "hydra/launcher/joblib": OPTIONAL[5],
}


def targets(node, path: str = "") -> Iterator[tuple[str, str]]:
    """(config path, `_target_`) of every node of the config that names one (interpolations left unresolved)."""
    if node is None or node._is_none() or node._is_missing():
        return
    if isinstance(node, DictConfig):
        if "_target_" in node and not OmegaConf.is_interpolation(node, "_target_"):
            yield path or "<root>", str(node._target_)
        for key in node:
            if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):
                yield from targets(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            if not OmegaConf.is_interpolation(node, index):
                yield from targets(node._get_node(index), f"{path}[{index}]")


def importable(module: str) -> str | None:
    """None when `module` imports; else why not, in a few words."""
    try:
        importlib.import_module(module)
        return None
    except ImportError as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    except Exception as err:  # installed but broken: its own import fails
        return f"importing {module} fails: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def needs_of(target: str) -> Needs | None:
    return next((n for n in OPTIONAL if target == n.target or target.startswith(n.target + ".")), None)


def check_optional(cfg: DictConfig) -> None:
    """Refuse, in one line with the install command, a config whose logger, launcher, adapter or evaluation
    needs a package that is missing here (or SLURM, for hydra/launcher=slurm)."""
    for path, target in targets(cfg):
        needs = needs_of(target)
        if needs is None:
            continue
        missing = [why for why in map(importable, needs.modules) if why]
        if len(missing) == len(needs.modules):
            raise TunelabError(f"{needs.choice} needs {' or '.join(needs.modules)} ({path}: {target}), which is not "
                               f"installed here ({missing[0]}): {needs.install}")
        problem = needs.ready() if needs.ready else None
        if problem:
            raise TunelabError(f"{needs.choice} cannot start here: {problem}; run it where that works, or choose "
                               "another launcher (hydra/launcher=parallel runs trials on this machine)")


def missing_plugin(err: BaseException) -> TunelabError | None:
    """For Hydra's "Could not load 'hydra/launcher/ray'": the plugin to install."""
    text = str(err)
    for config, needs in PLUGIN_CONFIGS.items():
        if f"Could not load '{config}'" in text or f"Could not find '{config}'" in text:
            return TunelabError(f"{needs.choice} needs the Hydra plugin that provides {config}, which is not "
                                f"installed here: {needs.install}")
    return None


def check_targets(cfg: DictConfig) -> None:
    """Every `_target_` resolves to something importable (a reward, a metric, a logger class), in one line."""
    from tunelab.config.options import locate

    for path, target in targets(cfg):
        if path.startswith("hydra.") or needs_of(target) is not None:
            continue  # Hydra's own plugins are checked by Hydra; optional ones by check_optional
        why = locate(target)[1]
        if why:
            raise TunelabError(f"{path}._target_ {target!r} does not resolve ({why}); check the module path and "
                               "the name, e.g. tunelab.methods.rewards.NumericAnswerReward")
