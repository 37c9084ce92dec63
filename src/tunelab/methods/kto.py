"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired examples
(prompt, completion, label: true desirable / false undesirable); paired preference rows are split into one
desirable and one undesirable example, as TRL's `unpair_preference_dataset` does.

Loss, per example, with r = log pi(y|x) - log ref(y|x) (summed over the completion) and z0 the KL estimate:
  desirable:   desirable_weight   * (1 - sigmoid(beta (r - z0)))
  undesirable: undesirable_weight * (1 - sigmoid(beta (z0 - r)))
z0 = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x)) on mismatched pairs: the prompt of example i
with the completion of example i-1 (TRL shifts completions by one within the batch), detached and averaged over
ranks. The reference is DPO's: the adapter-disabled policy for LoRA, a frozen copy for full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.core.logprobs import completion_logps, frozen_reference
from tunelab.data.tokenize import IGNORE
from tunelab.errors import TunelabError
from tunelab.methods.preference import PreferenceModule


@dataclass
class KTOOutput:
    losses: torch.Tensor            # one per example, weighted
    rewards: torch.Tensor           # beta * (log pi - log ref), detached


def check_kto_options(beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    if not beta > 0:
        raise TunelabError(f"method.module.beta={beta} must be > 0 (TRL's default 0.1)")
    for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not value > 0:
            raise TunelabError(f"method.module.{name}={value} must be > 0 (1.0 by default; the KTO paper "
                               "keeps desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3])")


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOOutput:
    """Eq. (7) of the KTO paper, per example, as TRL's KTOTrainer (`loss_type="kto"`)."""
    ratio = logps.float() - ref_logps.float()
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return KTOOutput(losses, (beta * ratio).detach())


def kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The batch's KL estimate z0 before the cross-rank mean and the clamp at 0, detached (TRL's `kl`)."""
    return (kl_logps.float() - ref_kl_logps.float()).mean().detach()


def first_supervised(labels: torch.Tensor) -> torch.Tensor:
    """Index of each row's first completion token (where the prompt ends)."""
    supervised = labels != IGNORE
    return torch.where(supervised.any(-1), supervised.int().argmax(-1), torch.full_like(supervised[:, 0], labels.shape[1], dtype=torch.long))


def mismatched_batch(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) of the KL sequences: prompt i + completion i-1, right-padded."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    starts, lengths = first_supervised(labels).tolist(), mask.sum(-1).tolist()
    rows = len(starts)
    pieces = []
    for i in range(rows):
        j = (i - 1) % rows
        pieces.append((torch.cat([ids[i, : starts[i]], ids[j, starts[j] : lengths[j]]]),
                       torch.cat([torch.full((starts[i],), IGNORE, dtype=labels.dtype, device=labels.device),
                                  labels[j, starts[j] : lengths[j]]])))
    width = max(len(p[0]) for p in pieces)
    out_ids = torch.stack([F.pad(p, (0, width - len(p)), value=pad_id) for p, _ in pieces])
    out_labels = torch.stack([F.pad(lab, (0, width - len(lab)), value=IGNORE) for _, lab in pieces])
    out_mask = torch.stack([F.pad(torch.ones_like(p), (0, width - len(p)), value=0) for p, _ in pieces])
    return out_ids, out_mask, out_labels


class KTOModule(PreferenceModule):
    """KTO on unpaired (prompt, completion, label) rows; logs loss, KL, rewards of each kind."""

    STATS = ("loss", "kl", "reward_desirable", "reward_undesirable", "logps")

    def __init__(self, model, optimizer, scheduler=None, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, reference_model: str | None = None):
        check_kto_options(beta, desirable_weight, undesirable_weight)
        super().__init__(model, optimizer, scheduler)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.ref_model = frozen_reference(model, reference_model)

    def on_fit_start(self) -> None:
        if self.trainer.datamodule is not None and self.trainer.datamodule.batch_size < 2:
            raise TunelabError("method=kto needs data.batch_size >= 2: its KL estimate pairs each prompt with "
                               "another example's completion in the same batch (TRL has the same rule)")

    def both_logps(self, model, batch: dict, kl_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        logps = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        with torch.no_grad():
            kl_logps = completion_logps(model, *kl_inputs)[0]
        return logps, kl_logps

    @torch.no_grad()
    def reference_logps(self, batch: dict, kl_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_model is None:
            with self.model.disable_adapter():
                return self.both_logps(self.model, batch, kl_inputs)
        return self.both_logps(self.ref_model, batch, kl_inputs)

    def batch_kl(self, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
        kl = kl_estimate(kl_logps, ref_kl_logps)
        if self._trainer is not None and self.trainer.world_size > 1:
            kl = self.all_gather(kl).mean()  # TRL's gather_for_metrics(kl).mean()
        return kl.clamp(min=0)

    def step_stats(self, batch: dict) -> tuple[torch.Tensor, dict]:
        kl_inputs = mismatched_batch(batch, self.pad_id)
        logps, kl_logps = self.both_logps(self.model, batch, kl_inputs)
        ref_logps, ref_kl_logps = self.reference_logps(batch, kl_inputs)
        kl = self.batch_kl(kl_logps, ref_kl_logps)
        desirable = batch["label"].bool()
        out = kto_loss(logps, ref_logps, desirable, kl, self.beta, self.desirable_weight, self.undesirable_weight)
        stats = {"kl": kl, "logps": logps.detach().mean()}
        for name, rows in (("reward_desirable", desirable), ("reward_undesirable", ~desirable)):
            if rows.any():  # a batch may hold one kind only: no mean of the other
                stats[name] = out.rewards[rows].mean()
        return out.losses.mean(), stats
