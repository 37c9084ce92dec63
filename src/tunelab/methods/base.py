"""The shared base of every method: optimizer, schedule, token-weighted loss, checkpoint slimming and the
runtime group's speed knobs."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torchmetrics import SumMetric

from tunelab.core.losses import (backbone_and_head, loss_chunk_size, model_inputs, model_labels, supervised_loss_sum,
                                  token_loss_sum)
from tunelab.core.runtime import RuntimeLevers


class LanguageModelModule(pl.LightningModule):
    """Holds a HF causal LM (plain or PEFT-wrapped) and the optimisation every method shares."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler: dict | None = None):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_cfg = dict(scheduler or {})
        self.val_loss_sum = SumMetric()
        self.val_tokens = SumMetric()
        # Checkpoints keep trainable weights only (see on_save_checkpoint), so loading is not strict.
        self.strict_loading = False
        self.levers = RuntimeLevers()  # the runtime group's speed knobs, set by the assembler
        self.loraplus_lr_ratio: float | None = None  # the adapter group's LoRA+ ratio, set by the assembler

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.levers.apply(self, self.trainer.precision)

    def on_fit_end(self) -> None:
        self.levers.restore()  # evaluation and export after training get the model back as it came

    def optimizer_parameters(self) -> list[dict]:
        """Decay matrices only: biases and norm weights are left alone, as is standard for transformers."""
        weight_decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]

    def build_optimizer(self):
        """The optimizer group over the trainable parameters; with LoRA+ (Hayou et al. 2024) PEFT's
        `create_loraplus_optimizer` gives the B matrices lr * loraplus_lr_ratio."""
        if not self.loraplus_lr_ratio:
            return self.optimizer_factory(self.optimizer_parameters())
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(self.model, self.optimizer_factory.func,
                                         loraplus_lr_ratio=self.loraplus_lr_ratio, **self.optimizer_factory.keywords)

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, for the LR schedule.

        Not `trainer.estimated_stepping_batches`: called here, it builds Lightning's train iterator
        before a checkpoint is restored, so a resumed run would never get its data position back."""
        trainer = self.trainer
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule else None
        if loader is None:
            return int(trainer.estimated_stepping_batches)
        batches = len(loader)
        limit = trainer.limit_train_batches
        batches = int(limit) if isinstance(limit, int) else max(1, int(batches * limit))
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        by_epochs = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        by_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return min(x for x in (by_epochs, by_steps) if x is not None) if (by_epochs or by_steps) else per_epoch

    def scheduler_steps(self) -> int:
        """Optimizer steps the schedule spans (an on-policy module makes several per training batch)."""
        return self.total_optimizer_steps()

    def configure_optimizers(self):
        from transformers import get_scheduler

        optimizer = self.build_optimizer()
        total = self.scheduler_steps()
        ratio = self.scheduler_cfg.get("warmup_ratio") or 0.0
        warmup = self.scheduler_cfg.get("warmup_steps") or math.ceil(ratio * total)  # one rule for every method
        scheduler = get_scheduler(
            self.scheduler_cfg.get("name", "cosine"),
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=max(total, 1),
            scheduler_specific_kwargs=dict(self.scheduler_cfg.get("kwargs") or {}),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        # Lightning's hook for sharding strategies: trainer=fsdp (tunelab.platform.sharding) shards the network here.
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights are reloaded from the model itself; storing them would make every LoRA
        # checkpoint as large as the base model.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


class CausalLMModule(LanguageModelModule):
    """Next-token cross-entropy on the supervised tokens: sft (responses) and pretrain (all tokens).

    head_on_supervised_only runs the LM head only where the loss looks (same loss, less compute and
    memory; models it cannot split fall back to the plain path), in chunks when runtime.chunked_loss is
    on. Packed batches (data.packing) are read with per-document attention (core.losses.model_inputs).
    The speed knobs every method shares are the runtime group's (src/tunelab/core/runtime.py).
    """

    def __init__(self, model: torch.nn.Module, optimizer, scheduler: dict | None = None,
                 head_on_supervised_only: bool = True):
        super().__init__(model, optimizer, scheduler)
        self.split = backbone_and_head(model) if head_on_supervised_only else None
        # from_pretrained returns the model in eval mode and Lightning keeps submodule modes as it
        # finds them; training mode is what switches gradient checkpointing (and dropout) on.
        model.train()

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split is not None:
            return supervised_loss_sum(*self.split, batch, loss_chunk_size(self.model))
        logits = self.model(**model_inputs(self.model, batch)).logits
        return token_loss_sum(logits, model_labels(self.model, batch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, tokens = self.loss_sum(batch)
        # Token-weighted over the whole optimizer step: Lightning divides by the accumulation count
        # and DDP averages over ranks, so scale both back before dividing by the step's token count.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        loss = loss_sum * scale / batch["step_tokens"].clamp(min=1)
        self.log("train/loss", loss_sum / tokens.clamp(min=1), prog_bar=True, batch_size=int(tokens))
        self.log("train/tokens", tokens.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss_sum, tokens = self.loss_sum(batch)
        self.val_loss_sum.update(loss_sum)
        self.val_tokens.update(tokens)

    def on_validation_epoch_end(self) -> None:
        # SumMetric reduces over ranks, so the token-weighted mean is the same on 1 or N processes.
        loss = self.val_loss_sum.compute() / self.val_tokens.compute().clamp(min=1)
        self.log_dict({"val/loss": loss, "val/perplexity": torch.exp(loss)}, prog_bar=True, sync_dist=False)
        self.val_loss_sum.reset()
        self.val_tokens.reset()
