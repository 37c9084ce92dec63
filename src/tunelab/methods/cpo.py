"""Contrastive preference optimisation (Xu et al. 2024, arXiv:2401.08417) and SimPO (Meng et al. 2024,
arXiv:2405.14734) as its `loss_type="simpo"` sibling, as TRL's CPOTrainer has them: reference-free, so no
reference model is built.

cpo (sigmoid): -log sigmoid(beta (log pi_c - log pi_r)) on summed log-probs, + cpo_alpha * NLL of chosen;
simpo:         -log sigmoid(beta (mean log pi_c - mean log pi_r) - simpo_gamma), per-token means, and
               cpo_alpha = 0 (pure SimPO; TRL adds the NLL when cpo_alpha > 0);
hinge / ipo:   TRL's hinge and IPO forms on the same margin (ipo on per-token means, as TRL)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.core.logprobs import chosen_nll, pair_logps, preference_accuracy
from tunelab.errors import TunelabError
from tunelab.methods.preference import PreferenceModule

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
LENGTH_NORMALISED = ("ipo", "simpo")  # TRL's average_log_prob


@dataclass
class CPOOutput:
    losses: torch.Tensor            # one per pair
    chosen_rewards: torch.Tensor    # beta * log-prob (mean for simpo/ipo), detached
    rejected_rewards: torch.Tensor


def check_cpo_options(beta: float, loss_type: str, simpo_gamma: float, cpo_alpha: float, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise TunelabError(f"method.module.loss_type={loss_type} is unknown; use one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise TunelabError(f"method.module.beta={beta} must be > 0 (TRL's default 0.1; the SimPO paper uses 2.0-2.5)")
    if not simpo_gamma >= 0:
        raise TunelabError(f"method.module.simpo_gamma={simpo_gamma} must be >= 0: it is the target reward margin "
                           "(TRL's default 0.5)")
    if not cpo_alpha >= 0:
        raise TunelabError(f"method.module.cpo_alpha={cpo_alpha} must be >= 0 (0: no NLL term)")
    if not 0 <= label_smoothing < 0.5:
        raise TunelabError(f"method.module.label_smoothing={label_smoothing} must be in [0, 0.5)")


def cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> CPOOutput:
    """Per-pair losses from the policy's log-probs (summed, or per-token means for simpo/ipo)."""
    chosen, rejected = chosen_logps.float(), rejected_logps.float()
    margin = chosen - rejected
    if loss_type == "simpo":
        margin = margin - simpo_gamma / beta  # so that beta * margin = beta * d - gamma, as in the paper
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        check_cpo_options(beta, loss_type, simpo_gamma, 0.0, label_smoothing)
    return CPOOutput(losses, beta * chosen.detach(), beta * rejected.detach())


class CPOModule(PreferenceModule):
    """CPO / SimPO on (prompt, chosen, rejected); no reference model."""

    STATS = ("loss", "accuracy", "margin", "nll_chosen", "reward_chosen", "reward_rejected", "logps_chosen",
             "logps_rejected")

    def __init__(self, model, optimizer, scheduler=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 simpo_gamma: float = 0.5, cpo_alpha: float = 1.0, label_smoothing: float = 0.0):
        check_cpo_options(beta, loss_type, simpo_gamma, cpo_alpha, label_smoothing)
        super().__init__(model, optimizer, scheduler)
        self.beta, self.loss_type, self.simpo_gamma = beta, loss_type, simpo_gamma
        self.cpo_alpha, self.label_smoothing = cpo_alpha, label_smoothing
        self.ref_model = None  # reference-free: nothing to build

    def step_stats(self, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected, n_chosen, n_rejected = pair_logps(self.model, batch, self.pad_id)
        if self.loss_type in LENGTH_NORMALISED:
            scores = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        else:
            scores = chosen, rejected
        out = cpo_loss(*scores, self.beta, self.loss_type, self.simpo_gamma, self.label_smoothing)
        nll = chosen_nll(chosen, n_chosen)
        stats = {"accuracy": preference_accuracy(out.chosen_rewards, out.rejected_rewards),
                 "margin": (out.chosen_rewards - out.rejected_rewards).mean(), "nll_chosen": nll.detach(),
                 "reward_chosen": out.chosen_rewards.mean(), "reward_rejected": out.rejected_rewards.mean(),
                 "logps_chosen": chosen.detach().mean(), "logps_rejected": rejected.detach().mean()}
        loss = out.losses.mean()
        return (loss + self.cpo_alpha * nll if self.cpo_alpha else loss), stats
