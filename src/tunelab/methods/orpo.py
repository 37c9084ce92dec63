"""Odds-ratio preference optimisation (Hong et al. 2024, arXiv:2403.07691): reference-free, so no reference
model is built. Loss = NLL of the chosen answers (per token) + beta * mean over pairs of
-log sigmoid(log odds(chosen) - log odds(rejected)), with odds(y) = p / (1 - p) of the per-token mean
log-prob, as TRL's ORPOTrainer computes it (`odds_ratio_loss`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.core.logprobs import chosen_nll, pair_logps, preference_accuracy
from tunelab.errors import TunelabError
from tunelab.methods.preference import PreferenceModule


@dataclass
class ORPOOutput:
    losses: torch.Tensor            # beta * -log sigmoid(log odds ratio), one per pair
    log_odds: torch.Tensor          # log odds(chosen) - log odds(rejected), detached
    chosen_rewards: torch.Tensor    # beta * mean log-prob (TRL's logged reward), detached
    rejected_rewards: torch.Tensor


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): the log of 1 - p from log p."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float = 0.1) -> ORPOOutput:
    """Per-pair odds-ratio term from per-token mean log-probs (Eqs. 4 and 7 of the paper)."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return ORPOOutput(-beta * F.logsigmoid(log_odds), log_odds.detach(), beta * chosen.detach(), beta * rejected.detach())


def check_beta(beta: float) -> None:
    if not beta > 0:
        raise TunelabError(f"method.module.beta={beta} must be > 0")


class ORPOModule(PreferenceModule):
    """ORPO on (prompt, chosen, rejected); no reference model."""

    STATS = ("loss", "accuracy", "log_odds_ratio", "nll_chosen", "reward_chosen", "reward_rejected",
             "logps_chosen", "logps_rejected")

    def __init__(self, model, optimizer, scheduler=None, beta: float = 0.1):
        check_beta(beta)
        super().__init__(model, optimizer, scheduler)
        self.beta = beta
        self.ref_model = None  # reference-free: nothing to build

    def step_stats(self, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected, n_chosen, n_rejected = pair_logps(self.model, batch, self.pad_id)
        out = orpo_loss(chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1), self.beta)
        nll = chosen_nll(chosen, n_chosen)
        stats = {"accuracy": preference_accuracy(out.chosen_rewards, out.rejected_rewards),
                 "log_odds_ratio": out.log_odds.mean(), "nll_chosen": nll.detach(),
                 "reward_chosen": out.chosen_rewards.mean(), "reward_rejected": out.rejected_rewards.mean(),
                 "logps_chosen": chosen.detach().mean(), "logps_rejected": rejected.detach().mean()}
        return nll + out.losses.mean(), stats
