"""Generation metrics during training: the evaluator's metrics on a few val examples every K epochs."""

from __future__ import annotations

import pytorch_lightning as pl


class GenerationMetrics(pl.Callback):
    def __init__(self, evaluator, every_n_epochs: int = 1, split: str = "val", max_examples: int | None = 16):
        self.evaluator = evaluator
        self.every_n_epochs, self.split, self.max_examples = every_n_epochs, split, max_examples

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or trainer.sanity_checking:
            return
        # Rank zero generates for the whole (small) sample; the others wait at the barrier below,
        # so no rank runs ahead into the next epoch's collectives.
        if trainer.is_global_zero:
            result = self.evaluator.predictions(pl_module.model, trainer.datamodule, split=self.split,
                                                max_examples=self.max_examples)
            numeric = {f"generation/{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))}
            for logger in trainer.loggers:
                logger.log_metrics(numeric, step=trainer.global_step)
            self.last = numeric
        trainer.strategy.barrier()
