"""What `tunelab-evaluate` and `tunelab-chat` are pointed at: a run dir, a final/ folder or a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab.errors import TunelabError

RUN_CONFIG = "resolved_config.yaml"


@dataclass
class Target:
    model_path: str               # what load_pretrained loads: a folder, embedded:NAME or a hub id
    run_config: DictConfig | None  # the training run's resolved config, when there is one
    label: str                    # "tuned" for a trained run, "model" otherwise


def run_config_of(folder: Path) -> DictConfig | None:
    for candidate in (folder, folder.parent):
        if (candidate / RUN_CONFIG).is_file():
            return OmegaConf.load(candidate / RUN_CONFIG)
    return None


def resolve_target(target: str | None) -> Target | None:
    """None for no target (the model group's model is meant)."""
    if target is None or str(target).strip() == "":
        return None
    path = Path(str(target)).expanduser()
    if path.is_dir() and (path / RUN_CONFIG).is_file() and not (path / "config.json").is_file():
        for export in ("final", "merged"):
            folder = path / export
            if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
                return Target(str(folder), run_config_of(path), "tuned")
        raise TunelabError(f"run dir {path} has no final/ folder (the run did not finish?); "
                           "train it to the end or point target at a model folder")
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise TunelabError(f"{path} is neither a run dir (no {RUN_CONFIG}) nor an HF model folder (no config.json); "
                               "point target at a run dir, its final/ folder, or a model folder")
        config = run_config_of(path)
        return Target(str(path), config, "tuned" if config is not None else "model")
    if str(target).startswith(("/", ".", "~")):
        raise TunelabError(f"target {target} does not exist; give a run dir, a final/ folder, a model folder "
                           "or embedded:smollm2-135m-instruct")
    return Target(str(target), None, "model")


def chat_template_of(run_config: DictConfig | None) -> str:
    """The prompt template the run trained with ('chat' for the tokenizer's own)."""
    if run_config is None or "data" not in run_config:
        return "chat"
    return str(run_config.data.get("template", "chat"))
