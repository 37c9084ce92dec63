"""The Lightning side every preference objective shares (DPO, KTO, ORPO, SimPO/CPO): dropout off, the
method's `step_stats(batch) -> (loss, stats)` logged per step in training and as exact means over the
validation set (sums, so the mean is the same on one rank or many)."""

from __future__ import annotations

import torch
from torchmetrics import SumMetric

from tunelab.core.logprobs import disable_dropout
from tunelab.methods.base import LanguageModelModule


class PreferenceModule(LanguageModelModule):
    STATS: tuple[str, ...] = ("loss",)

    def __init__(self, model, optimizer, scheduler=None):
        super().__init__(model, optimizer, scheduler)
        disable_dropout(model)
        self.val_stats = torch.nn.ModuleDict({k: SumMetric() for k in (*self.STATS, "pairs")})

    @property
    def pad_id(self) -> int:
        return self.model.config.pad_token_id or 0

    @staticmethod
    def batch_rows(batch: dict) -> int:
        """Pairs of a paired batch, examples of an unpaired one."""
        return batch["chosen_input_ids" if "chosen_input_ids" in batch else "input_ids"].shape[0]

    def step_stats(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, stats = self.step_stats(batch)
        rows = self.batch_rows(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=rows)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, stats = self.step_stats(batch)
        rows = self.batch_rows(batch)
        for key, value in {"loss": loss, **stats}.items():
            self.val_stats[key].update(value.detach() * rows)  # sums, so the mean is exact over ranks
        self.val_stats["pairs"].update(torch.tensor(float(rows), device=self.device))

    def on_validation_epoch_end(self) -> None:
        totals = {k: m.compute() for k, m in self.val_stats.items()}
        rows = totals.pop("pairs").clamp(min=1)
        self.log("val/loss", totals.pop("loss") / rows, prog_bar=True, sync_dist=False)
        self.log_dict({f"val/{k}": v / rows for k, v in totals.items()}, sync_dist=False)
        for metric in self.val_stats.values():
            metric.reset()
