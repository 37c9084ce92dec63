"""Compose a train config like the CLI does and run one short training on it, recording every step.

A short fit uses the same parts as `tunelab-train` (model, datamodule, adapter, method module,
Trainer from `cfg.trainer`, TrackDataProgress) and leaves out only what does not train: evaluation,
export and loggers. What it records per optimizer step is the step's token-weighted loss (summed
over micro-batches and ranks) and the gradient norm before clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback

from tunelab.data.batching import TrackDataProgress
from tunelab.run.assemble import assemble, build_trainer, finalize


@dataclass
class Trace:
    """What a short training measured, one entry per optimizer step."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    module: pl.LightningModule | None = None
    datamodule: pl.LightningDataModule | None = None

    def as_dict(self) -> dict:
        return {"losses": self.losses, "grad_norms": self.grad_norms, "lrs": self.lrs}


class StepRecorder(Callback):
    """Per-step loss and pre-clipping grad norm; the loss is reduced over ranks at the end."""

    def __init__(self):
        self.step_of_batch = 0
        self.losses: dict[int, float] = {}
        self.grad_norms: dict[int, float] = {}
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_of_batch = trainer.global_step  # every micro-batch of a step sees the same value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back the returned loss divided by the accumulation count; the module
        # scaled it by accumulation x world size, so this is the micro-batch's share of the step loss.
        share = float(outputs["loss"]) / trainer.world_size
        self.losses[self.step_of_batch] = self.losses.get(self.step_of_batch, 0.0) + share

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Called after the closure's backward (DDP has already averaged the gradients) and before clipping.
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.tensor(0.0)
        self.grad_norms[trainer.global_step] = float(norm)
        self.lrs[trainer.global_step] = float(optimizer.param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        steps = sorted(self.losses)
        local = torch.tensor([self.losses[s] for s in steps], dtype=torch.float64)
        total = trainer.strategy.reduce(local.to(pl_module.device), reduce_op="sum") if trainer.world_size > 1 else local
        self.losses = dict(zip(steps, total.cpu().tolist()))

    def trace(self) -> Trace:
        def ordered(values: dict[int, float]) -> list[float]:
            return [values[s] for s in sorted(values)]

        return Trace(ordered(self.losses), ordered(self.grad_norms), ordered(self.lrs))


class StopAfter(Callback):
    """Ends the fit after `steps` optimizer steps, as if the process had been interrupted there."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def build_parts(cfg: DictConfig):
    """(module, datamodule) built by the assembler `tunelab-train` uses, so every method verifies as it trains."""
    parts = assemble(finalize(cfg))
    return parts.module, parts.datamodule


def short_fit(cfg: DictConfig, work_dir: Path, stop_after: int | None = None, save_every: int | None = None,
              ckpt_path: str | None = None) -> Trace:
    """Train `cfg` for cfg.trainer.max_steps steps (or stop early), recording every step.

    save_every: write a checkpoint every that many steps with the user's own checkpoint callback
    into work_dir/checkpoints. ckpt_path: resume from it."""
    module, datamodule = build_parts(cfg)
    recorder = StepRecorder()
    callbacks = [recorder, TrackDataProgress()]
    if stop_after:
        callbacks.append(StopAfter(stop_after))
    if save_every:
        checkpoint_cfg = OmegaConf.merge(OmegaConf.to_container(cfg.callbacks.checkpoint), {
            "dirpath": str(work_dir / "checkpoints"), "every_n_train_steps": save_every,
            "save_top_k": -1, "save_last": False, "filename": "{step}"})
        callbacks.append(instantiate(checkpoint_cfg, _convert_="all"))
    trainer = build_trainer(cfg, logger=False, callbacks=callbacks, default_root_dir=str(work_dir),
                            enable_checkpointing=bool(save_every), enable_progress_bar=False,
                            enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    trace = recorder.trace()
    trace.module, trace.datamodule = module, datamodule
    return trace


def max_relative_gap(a: list[float], b: list[float]) -> float:
    """Largest |a-b| / max(|a|,|b|) over steps; inf when the step counts differ."""
    if len(a) != len(b) or not a:
        return math.inf
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))
