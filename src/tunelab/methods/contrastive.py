"""Contrastive fine-tuning of text embeddings: InfoNCE with in-batch negatives (and optional hard negatives).

An embedding is the pooled last hidden state of the backbone (the causal LM without its LM head,
LoRA layers active): the mean over real tokens, or the last real token. Each anchor's positive is
the right answer among every positive (and hard negative) in the batch, scored by cosine similarity
over a temperature (Oord et al. 2018; Gao et al. 2021, SimCSE's supervised form). Negatives are
in-batch per process: under DDP each rank contrasts against its own batch (documented, not gathered).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from tunelab.errors import TunelabError
from tunelab.eval.generation import autocast
from tunelab.methods.base import LanguageModelModule
from tunelab.methods.reward import last_token_index, unwrap

POOLINGS = ("mean", "last")


def check_options(temperature: float, pooling: str) -> None:
    if pooling not in POOLINGS:
        raise TunelabError(f"method.module.pooling={pooling} is unknown; use one of {', '.join(POOLINGS)}")
    if not temperature > 0:
        raise TunelabError(f"method.module.temperature={temperature} must be > 0 (0.05 is SimCSE's)")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(attention_mask)]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def embed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Unit-length embeddings, one per row (float32)."""
    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return F.normalize(pool(hidden, attention_mask, pooling).float(), dim=-1)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None,
             temperature: float = 0.05, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(InfoNCE loss, in-batch top-1 accuracy) for unit embeddings; row i's positive is candidate i."""
    if anchor.shape[0] < 2:
        raise TunelabError("contrastive learning needs at least 2 pairs per batch (the other pairs are the "
                           "negatives); raise data.batch_size")
    candidates = positive if negative is None else torch.cat([positive, negative])
    logits = anchor @ candidates.T / temperature
    targets = torch.arange(anchor.shape[0], device=anchor.device)
    loss = F.cross_entropy(logits, targets)
    if symmetric:  # also retrieve the anchor from each positive
        loss = (loss + F.cross_entropy(positive @ anchor.T / temperature, targets)) / 2
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, accuracy


class ContrastiveModule(LanguageModelModule):
    """InfoNCE over (anchor, positive[, negative]) batches; logs loss and in-batch accuracy."""

    def __init__(self, model, optimizer, scheduler=None, temperature: float = 0.05, pooling: str = "mean",
                 symmetric: bool = False):
        super().__init__(model, optimizer, scheduler)
        check_options(temperature, pooling)
        self.temperature, self.pooling, self.symmetric = temperature, pooling, symmetric
        self.val_stats = torch.nn.ModuleDict({k: SumMetric() for k in ("loss", "accuracy", "pairs")})

    def on_fit_start(self) -> None:
        batch_size = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if batch_size is not None and batch_size < 2:
            raise TunelabError(f"data.batch_size={batch_size}: contrastive learning needs at least 2 pairs per "
                               "batch (the other pairs are the negatives); raise it")

    def step_stats(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        views = {role: embed(self.model, batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"], self.pooling)
                 for role in ("anchor", "positive", "negative") if f"{role}_input_ids" in batch}
        return info_nce(views["anchor"], views["positive"], views.get("negative"), self.temperature, self.symmetric)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, accuracy = self.step_stats(batch)
        pairs = batch["anchor_input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        self.log("train/accuracy", accuracy, batch_size=pairs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pairs = batch["anchor_input_ids"].shape[0]
        if pairs < 2:
            return  # a last batch of one has no negatives: nothing to measure
        loss, accuracy = self.step_stats(batch)
        self.val_stats["loss"].update(loss * pairs)
        self.val_stats["accuracy"].update(accuracy * pairs)
        self.val_stats["pairs"].update(torch.tensor(float(pairs), device=self.device))

    def on_validation_epoch_end(self) -> None:
        totals = {k: m.compute() for k, m in self.val_stats.items()}
        pairs = totals["pairs"].clamp(min=1)
        self.log("val/loss", totals["loss"] / pairs, prog_bar=True, sync_dist=False)
        self.log("val/accuracy", totals["accuracy"] / pairs, sync_dist=False)
        for metric in self.val_stats.values():
            metric.reset()


class RetrievalEvaluator:
    """Held-out retrieval: each anchor ranks every positive of the split; accuracy@1, MRR, and the InfoNCE
    loss with the whole split as candidates."""

    def __init__(self, split: str = "test", batch_size: int = 32, precision: str | None = "bf16",
                 pooling: str = "mean", temperature: float = 0.05, compare_base: bool = True,
                 max_examples: int | None = None):
        check_options(temperature, pooling)
        self.temperature = temperature  # for the split-wide InfoNCE loss
        self.split, self.batch_size, self.precision, self.pooling = split, batch_size, precision, pooling
        self.compare_base, self.max_examples = compare_base, max_examples

    @torch.no_grad()
    def embeddings(self, model, datamodule, rows: list[dict], role: str) -> torch.Tensor:
        device = next(model.parameters()).device
        out = []
        for start in range(0, len(rows), self.batch_size):
            batch = datamodule.collator([{"input_ids": r[f"{role}_input_ids"]} for r in rows[start : start + self.batch_size]])
            with autocast(self.precision, device):
                out.append(embed(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), self.pooling).cpu())
        return torch.cat(out)

    def run(self, model, datamodule) -> tuple[dict[str, float], list[dict]]:
        dataset = datamodule.datasets.get(self.split)
        if dataset is None or len(dataset) < 2:
            return {}, []
        was_training = model.training
        model.eval()
        try:
            anchors = self.embeddings(model, datamodule, dataset.rows, "anchor")
            positives = self.embeddings(model, datamodule, dataset.rows, "positive")
        finally:
            model.train(was_training)
        scores = anchors @ positives.T
        right = scores.diagonal().unsqueeze(1)
        ranks = 1 + (scores > right).sum(1)  # 1 = the right positive scored highest
        top = scores.argmax(1)
        s = self.split
        metrics = {f"{s}/accuracy_at_1": (ranks == 1).float().mean().item(),
                   f"{s}/mrr": (1.0 / ranks.float()).mean().item(),
                   f"{s}/chance_accuracy_at_1": 1.0 / len(dataset),
                   f"{s}/loss": F.cross_entropy(scores / self.temperature, torch.arange(len(dataset))).item()}
        pairs = datamodule.examples[self.split]
        rows = [{"anchor": p.anchor, "positive": p.positive, "retrieved": pairs[t].positive, "rank": int(r)}
                for p, t, r in zip(pairs, top.tolist(), ranks.tolist())]
        return metrics, rows[: self.max_examples or None]
