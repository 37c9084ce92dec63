"""Judge a model on a held-out split: teacher-forced loss/perplexity and generation metrics."""

from __future__ import annotations

import math

import torch

from tunelab.eval.generation import autocast, generate
from tunelab.methods.base import token_loss_sum


class Evaluator:
    def __init__(self, split: str = "test", metrics: dict | None = None, max_examples: int | None = 64,
                 batch_size: int = 16, precision: str | None = "bf16", generation: dict | None = None,
                 compare_base: bool = True):
        self.split = split
        self.metrics = dict(metrics or {})
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.precision = precision
        self.generation = dict(generation or {})
        self.compare_base = compare_base

    @torch.no_grad()
    def loss(self, model, datamodule) -> dict[str, float]:
        dataset = datamodule.datasets.get(self.split)
        if dataset is None or not len(dataset):
            return {}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        for batch in datamodule.loader(self.split, train=False, shard=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(self.precision, device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss_sum, count = token_loss_sum(logits, batch["labels"])
            total, tokens = total + loss_sum.item(), tokens + int(count)
        model.train(was_training)
        loss = total / max(tokens, 1)
        return {f"{self.split}/loss": loss, f"{self.split}/perplexity": math.exp(min(loss, 50.0))}

    def predictions(self, model, datamodule) -> tuple[dict[str, float], list[dict]]:
        conversations = datamodule.conversations(self.split)[: self.max_examples or None]
        if not conversations or not self.metrics:
            return {}, []
        formatter = datamodule.formatter
        prompts = [formatter.generation_prompt(c.prompt) for c in conversations]
        references = [c.reference for c in conversations]
        outputs = generate(model, datamodule.tokenizer, prompts, batch_size=self.batch_size,
                           precision=self.precision, **self.generation)
        means, rows = {}, [{"prompt": c.prompt[-1]["content"], "reference": r, "prediction": o}
                           for c, r, o in zip(conversations, references, outputs)]
        for metric in self.metrics.values():
            metric_means, per_example = metric(outputs, references)
            means.update({f"{self.split}/{k}": v for k, v in metric_means.items()})
            for row, scores in zip(rows, per_example):
                row.update(scores)
        return means, rows

    def run(self, model, datamodule) -> tuple[dict[str, float], list[dict]]:
        metrics = self.loss(model, datamodule)
        generated, rows = self.predictions(model, datamodule)
        return {**metrics, **generated}, rows
