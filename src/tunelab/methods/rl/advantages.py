"""Advantage estimators by name (verl's `@register_adv_est` pattern): `method.module.advantage=gae|group|...`.

Each takes the rollout's `AdvantageInputs` and the module's `Options` and returns (advantages, returns):
advantages of shape (B,) (one per completion) or (B, T) (one per token), returns only where a critic learns from
them. A new estimator is one registered function and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tunelab.core.tensors import masked_whiten
from tunelab.errors import TunelabError
from tunelab.methods.rl.kl import token_rewards
from tunelab.methods.rl.options import Options

SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class AdvantageInputs:
    scores: torch.Tensor             # (B,) the reward of each completion (weighted, penalised, clipped)
    mask: torch.Tensor               # (B, T) float: response tokens up to and including the first EOS
    kl: torch.Tensor | None          # (B, T) KL estimate per token (masked) when it goes in the reward, else None
    beta: float                      # its coefficient now (the adaptive controller may have moved it)
    values: torch.Tensor | None      # (B, T) the critic's values at sampling time
    num_generations: int             # completions per prompt, adjacent in the batch


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[AdvantageInputs, Options], tuple[torch.Tensor, torch.Tensor | None]]
    needs_critic: bool = False
    needs_groups: bool = False       # compares the completions of one prompt: num_generations >= 2


ADVANTAGES: dict[str, Estimator] = {}


def register_advantage(name: str, needs_critic: bool = False, needs_groups: bool = False):
    def add(fn):
        ADVANTAGES[name] = Estimator(fn, needs_critic, needs_groups)
        return fn

    return add


def estimator(name: str) -> Estimator:
    if name not in ADVANTAGES:
        raise TunelabError(f"method.module.advantage={name!r}; use one of {', '.join(ADVANTAGES)}")
    return ADVANTAGES[name]


def sequence_rewards(x: AdvantageInputs) -> torch.Tensor:
    """Each completion's reward, less beta x its KL summed over its tokens when the KL goes in the reward."""
    return x.scores if x.kl is None else x.scores - x.beta * x.kl.sum(-1)


# ---------------------------------------------------------------- the maths, checked by hand in tests


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns) by generalised advantage estimation; positions past a response's end
    carry no reward and no value, so the last real token bootstraps from 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def group_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Unbiased std of each group's rewards (TRL's nanstd), repeated for each member."""
    return rewards.view(-1, num_generations).std(dim=1, unbiased=True).repeat_interleave(num_generations)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"):
    """(advantages, std used for scaling) of GRPO: reward minus its group's mean, divided by the std of
    the group (`group`), of the whole batch (`batch`), or not at all (`none`, Dr. GRPO); + 1e-4 as TRL."""
    grouped = rewards.view(-1, num_generations)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = group_std(rewards, num_generations)
    elif scale_rewards == "batch":
        std = rewards.std(unbiased=True).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "none":
        return advantages, group_std(rewards, num_generations)
    else:
        raise TunelabError(f"method.module.scale_rewards={scale_rewards!r}; use one of {', '.join(SCALE_REWARDS)}")
    return advantages / (std + 1e-4), std


def rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool = False) -> torch.Tensor:
    """Each reward minus the mean of the other k-1 of its group (TRL's RLOOTrainer); optionally whitened
    over the batch."""
    grouped = rewards.view(-1, num_generations)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    advantages = (grouped - baseline).view(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=True) + 1e-4)
    return advantages


# ---------------------------------------------------------------- the registry


@register_advantage("gae", needs_critic=True)
def gae_estimator(x: AdvantageInputs, o: Options):
    """PPO's: the score on the last token (and -beta x KL on every token), GAE over the critic's values, per token."""
    kl = x.kl if x.kl is not None else torch.zeros_like(x.mask)
    rewards = token_rewards(x.scores, kl, x.mask, x.beta)
    if o.whiten_rewards:
        rewards = masked_whiten(rewards, x.mask, shift_mean=False) * x.mask
    advantages, returns = gae(rewards, x.values, x.mask, o.gamma, o.lam)
    if o.whiten_advantages:
        advantages = masked_whiten(advantages, x.mask) * x.mask
    return advantages, returns


@register_advantage("group", needs_groups=True)
def group_estimator(x: AdvantageInputs, o: Options):
    """GRPO's (Shao et al. 2024): the reward relative to its group, scaled by `scale_rewards`."""
    return group_advantages(sequence_rewards(x), x.num_generations, o.scale_rewards)[0], None


@register_advantage("leave_one_out", needs_groups=True)
def leave_one_out_estimator(x: AdvantageInputs, o: Options):
    """RLOO's (Ahmadian et al. 2024): the reward minus the mean of the other completions of its prompt."""
    return rloo_advantages(sequence_rewards(x), x.num_generations, o.normalize_advantages), None


@register_advantage("reinforce_baseline", needs_groups=True)
def reinforce_baseline_estimator(x: AdvantageInputs, o: Options):
    """REINFORCE++-baseline (Hu et al. 2025; verl's `reinforce_plus_plus_baseline`): the reward minus its group's
    mean, then whitened over the batch. Departs from verl, which whitens over tokens: here over completions."""
    grouped = sequence_rewards(x).view(-1, x.num_generations)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    return (advantages - advantages.mean()) / (advantages.std(unbiased=True) + 1e-4), None
