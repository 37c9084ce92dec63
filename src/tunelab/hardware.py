"""Check that the chosen trainer can run on this machine, before anything slow starts."""

from __future__ import annotations

import importlib.util

import torch

from tunelab.errors import TunelabError


def training_device(trainer_cfg) -> torch.device:
    """Where Lightning will put the model (rank 0's device): the base model is evaluated there too."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def check_trainer(trainer_cfg) -> None:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    strategy = str(trainer_cfg.get("strategy", "auto"))
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise TunelabError("trainer=deepspeed needs the deepspeed package: pip install deepspeed (and a GPU)")
    if strategy.startswith("fsdp") and not torch.cuda.is_available():
        # Lightning's FSDPStrategy (FSDP1) raises "requires a GPU accelerator"; tunelab's FSDP2 strategy does not.
        raise TunelabError(f"trainer.strategy={strategy} is Lightning's FSDP1 strategy, which needs a CUDA GPU; "
                           "trainer=fsdp (FSDP2, tunelab.sharding) also runs on CPU processes")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise TunelabError(f"trainer asks for accelerator={accelerator} but no CUDA GPU is visible; "
                           "use trainer=cpu (or trainer=ddp for several CPU processes)")
