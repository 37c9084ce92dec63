"""Contrastive fine-tuning of text embeddings: InfoNCE with in-batch negatives (and optional hard negatives).

An embedding comes from a sentence-transformers model (its own modules: transformer, pooling,
normalisation; the default, all-MiniLM-L6-v2) or from a causal LM: the pooled last hidden state of
its backbone (LM head unused, LoRA layers active), the mean over real tokens or the last real token.
Each anchor's positive is the right answer among every positive (and hard negative) in the batch,
scored by cosine similarity over a temperature (Oord et al. 2018; Gao et al. 2021, SimCSE's
supervised form; sentence-transformers' MultipleNegativesRankingLoss). Under DDP the candidates are
gathered from every rank with gradients (as sentence-transformers' gather_across_devices does), so N
processes at batch B train exactly as one process at batch N*B; `gather_across_ranks=false` keeps
per-rank negatives. Gradient accumulation does not widen the negatives: each micro-batch is its own pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from tunelab.core.inference import inference
from tunelab.errors import TunelabError
from tunelab.eval.result import EvalResult
from tunelab.methods.base import LanguageModelModule
from tunelab.core.tensors import last_token_index, unwrap
from tunelab.models.sentence import is_sentence_transformer

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
    """Unit-length embeddings, one per row (float32). A sentence-transformers model pools with its own modules."""
    if is_sentence_transformer(model):
        features = model({"input_ids": input_ids, "attention_mask": attention_mask})
        return F.normalize(features["sentence_embedding"].float(), dim=-1)
    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return F.normalize(pool(hidden, attention_mask, pooling).float(), dim=-1)


def off_embedding_parameters(model) -> list[torch.nn.Parameter]:
    """Weights no embedding depends on: the HF pooler beside a sentence-transformers Pooling module, a
    causal LM's (untied) LM head."""
    if is_sentence_transformer(model):
        transformer = model[0]
        if getattr(transformer, "module_output_name", None) != "token_embeddings":
            return []  # the transformer's own pooled output may be the embedding
        return [p for name, p in transformer.named_parameters() if ".pooler." in f".{name}"]
    inner = unwrap(model)
    used = {id(p) for p in getattr(inner, inner.base_model_prefix).parameters()}
    return [p for p in inner.parameters() if id(p) not in used]


def gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(every rank's rows in rank order, where this rank's rows start, number of ranks).

    Gradients flow back to the rank that made each row (torch.distributed.nn); ranks may hold
    different numbers of rows (an epoch's last batch), so rows are padded for the exchange."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local, 0, 1
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    sizes = [int(n) for n in sizes]
    parts = all_gather(F.pad(local, (0, 0, 0, max(sizes) - local.shape[0])))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sum(sizes[:rank]), world


def local_rows(local: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    return local, 0, 1


def info_nce_terms(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None,
                   temperature: float = 0.05, symmetric: bool = False,
                   gather: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(InfoNCE summed over this rank's anchors, how many of them rank their positive first, anchors over
    all ranks, ranks) for unit embeddings; row i's positive is candidate i. `gather`: every rank's candidates."""
    share = gather_rows if gather else local_rows
    positives, offset, world = share(positive)
    if positives.shape[0] < 2:
        raise TunelabError("contrastive learning needs at least 2 pairs per batch (the other pairs are the "
                           "negatives); raise data.batch_size")
    candidates = positives if negative is None else torch.cat([positives, share(negative)[0]])
    logits = anchor @ candidates.T / temperature
    targets = offset + torch.arange(anchor.shape[0], device=anchor.device)
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    if symmetric:  # also retrieve the anchor from each positive
        reverse = F.cross_entropy(positive @ share(anchor)[0].T / temperature, targets, reduction="sum")
        loss_sum = (loss_sum + reverse) / 2
    return loss_sum, (logits.argmax(-1) == targets).sum(), positives.shape[0], world


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None,
             temperature: float = 0.05, symmetric: bool = False, gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(InfoNCE loss, this rank's in-batch top-1 accuracy). The loss is scaled so that DDP's average of
    the ranks' gradients is the gradient of the mean over every rank's anchors (one process: the mean)."""
    loss_sum, correct, total, world = info_nce_terms(anchor, positive, negative, temperature, symmetric, gather)
    return loss_sum * world / total, correct.float() / anchor.shape[0]


class ContrastiveModule(LanguageModelModule):
    """InfoNCE over (anchor, positive[, negative]) batches; logs loss and in-batch accuracy."""

    # Read by tunelab-verify's accumulation pair: the negatives are the other pairs of the micro-batch, so k
    # accumulated micro-batches of B are another objective than one batch of B*k (GradCache would make them one).
    accumulation_differs = ("its loss contrasts each pair with the other pairs of its micro-batch (in-batch "
                            "negatives), so batch B x accumulation k sees fewer negatives than batch B*k")

    def __init__(self, model, optimizer, scheduler=None, temperature: float = 0.05, pooling: str = "mean",
                 symmetric: bool = False, gather_across_ranks: bool = True):
        super().__init__(model, optimizer, scheduler)
        check_options(temperature, pooling)
        self.temperature, self.pooling, self.symmetric = temperature, pooling, symmetric
        self.gather = gather_across_ranks
        for param in off_embedding_parameters(model):  # DDP refuses trainable weights that get no gradient
            param.requires_grad_(False)
        self.val_stats = torch.nn.ModuleDict({k: SumMetric() for k in ("loss", "accuracy", "pairs")})

    def on_fit_start(self) -> None:
        batch_size = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if batch_size is not None and batch_size < 2:
            raise TunelabError(f"data.batch_size={batch_size}: contrastive learning needs at least 2 pairs per "
                               "batch (the other pairs are the negatives); raise it")

    def embeddings(self, batch: dict) -> dict[str, torch.Tensor]:
        return {role: embed(self.model, batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"], self.pooling)
                for role in ("anchor", "positive", "negative") if f"{role}_input_ids" in batch}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        views = self.embeddings(batch)
        loss, accuracy = info_nce(views["anchor"], views["positive"], views.get("negative"), self.temperature,
                                  self.symmetric, self.gather)
        pairs = batch["anchor_input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        self.log("train/accuracy", accuracy, batch_size=pairs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        views = self.embeddings(batch)
        loss_sum, correct, _, _ = info_nce_terms(views["anchor"], views["positive"], views.get("negative"),
                                                 self.temperature, self.symmetric, self.gather)
        self.val_stats["loss"].update(loss_sum.detach())  # sums, reduced over ranks: exact means
        self.val_stats["accuracy"].update(correct.float())
        self.val_stats["pairs"].update(torch.tensor(float(batch["anchor_input_ids"].shape[0]), device=self.device))

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

    def __init__(self, split: str = "test", batch_size: int = 32, precision: str | None = "auto",
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
            out.append(embed(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), self.pooling).cpu())
        return torch.cat(out)

    def run(self, model, datamodule) -> EvalResult:
        dataset = datamodule.datasets.get(self.split)
        if dataset is None or len(dataset) < 2:
            return EvalResult()
        with inference(model, self.precision):
            anchors = self.embeddings(model, datamodule, dataset.rows, "anchor")
            positives = self.embeddings(model, datamodule, dataset.rows, "positive")
        metrics = retrieval_metrics(anchors, positives, self.temperature, self.split)
        pairs = datamodule.examples[self.split]
        scores = anchors @ positives.T
        rows = [{"anchor": p.anchor, "positive": p.positive, "retrieved": pairs[t].positive, "rank": int(r)}
                for p, t, r in zip(pairs, scores.argmax(1).tolist(), retrieval_ranks(scores).tolist())]
        return EvalResult(metrics, rows[: self.max_examples or None])


def retrieval_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each anchor's own positive (the diagonal) among all positives; 1 = scored highest."""
    return 1 + (scores > scores.diagonal().unsqueeze(1)).sum(1)


def retrieval_metrics(anchors: torch.Tensor, positives: torch.Tensor, temperature: float, split: str) -> dict[str, float]:
    """accuracy@1, MRR and the InfoNCE loss with every positive of the split as a candidate (unit embeddings)."""
    scores = anchors.float() @ positives.float().T
    ranks = retrieval_ranks(scores)
    return {f"{split}/accuracy_at_1": (ranks == 1).float().mean().item(),
            f"{split}/mrr": (1.0 / ranks.float()).mean().item(),
            f"{split}/chance_accuracy_at_1": 1.0 / len(anchors),
            f"{split}/loss": F.cross_entropy(scores / temperature, torch.arange(len(anchors))).item()}
