"""KL(policy || reference) from sampled tokens, by name (Schulman's k1/k2/k3 estimators), and the adaptive KL
coefficient of Ziegler et al. 2019. Where the KL goes (the reward or the loss) is `use_kl_in_reward`."""

from __future__ import annotations

from typing import Callable

import torch

from tunelab.errors import TunelabError

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register_kl(name: str):
    def add(fn):
        KL_ESTIMATORS[name] = fn
        return fn

    return add


@register_kl("k1")
def k1_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log p - log q: unbiased, one sample can be negative (PPO's reward penalty, TRL's RLOO)."""
    return logprobs - ref_logprobs


@register_kl("k2")
def k2_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """0.5 (log p - log q)^2: biased, >= 0, low variance."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register_kl("k3")
def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """q/p - log(q/p) - 1: unbiased and >= 0, exactly 0 when equal; written as TRL's GRPO writes it."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate of the named estimator."""
    if estimator not in KL_ESTIMATORS:
        raise TunelabError(f"method.module.kl_estimator={estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(-1).long() - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """-beta * KL on every response token, plus the sequence score on its last response token."""
    rewards = -beta * kl * mask
    rewards[torch.arange(len(scores), device=scores.device), last_index(mask)] += scores.to(rewards.dtype)
    return rewards


class AdaptiveKL:
    """beta fixed, or adapted towards a target KL (Ziegler et al. 2019) when `target` is set."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon
