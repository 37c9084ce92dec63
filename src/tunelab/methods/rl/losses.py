"""Policy losses by name, as TRL 1.16's `GRPOTrainer._compute_loss` spells them (`loss_type`,
`importance_sampling_level`), plus the generalised JSD of TRL's `DistillationTrainer`.

A loss type is a per-token objective and the normaliser that sums it into one number (its aggregation):

| loss_type | per token | aggregation |
|---|---|---|
| grpo, dr_grpo, dapo, bnpo, luspo | clipped surrogate -min(r A, clip(r) A) | its own name (below) |
| cispo | -sg(min(r, eps_high)) A log p (MiniMax-M1) | dapo |
| sapo | -sigmoid(tau (r - 1)) 4/tau A, tau by the advantage's sign (SAPO) | grpo |
| jsd | generalised JSD to the reference's distribution (beta: 0 forward, 1 reverse KL) | dapo |

GSPO is `importance_sampling_level=sequence` (the ratio of the mean log-ratio over a completion's tokens), RLOO's
ratio `sequence_sum` (of the summed log-ratio: the sequence's likelihood ratio). A new loss is one registered
function and its test; `policy_objective` adds the KL penalty and aggregates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from tunelab.core.tensors import masked_mean
from tunelab.errors import TunelabError
from tunelab.methods.rl.kl import kl_per_token
from tunelab.methods.rl.options import Options


@dataclass
class LossInputs:
    logprobs: torch.Tensor                   # (B, T) of the policy now, with gradients
    old_logprobs: torch.Tensor               # (B, T) of the policy that sampled (detached)
    advantages: torch.Tensor | None          # (B,) or (B, T)
    mask: torch.Tensor                       # (B, T) float: the tokens the loss counts
    logits: torch.Tensor | None = None       # (B, T, V) of the policy now, at the sampling temperature
    reference_logits: Callable[[], torch.Tensor] | None = None  # (B, T, V) of the reference, computed on demand

    def advantage_per_token(self) -> torch.Tensor:
        """(B, 1) or (B, T): TRL's conditional unsqueeze, so estimators may give one advantage per token."""
        return self.advantages.unsqueeze(1) if self.advantages.dim() == 1 else self.advantages


@dataclass(frozen=True)
class LossType:
    fn: Callable[[LossInputs, Options], tuple[torch.Tensor, dict]]
    aggregation: str
    kl_penalty: bool = True             # beta is the KL coefficient (False: the loss reads beta itself)
    uses_ratio: bool = True             # compares the policy with the one that sampled (needs old log-probs)
    needs_advantages: bool = True
    needs_reference_logits: bool = False


LOSSES: dict[str, LossType] = {}
AGGREGATIONS: dict[str, Callable] = {}
IMPORTANCE_SAMPLING_LEVELS: dict[str, Callable] = {}


def register_loss(*names: str, aggregation: str | None = None, **flags):
    """One per-token objective under one or more loss_type names; the aggregation defaults to the name."""

    def add(fn):
        for name in names:
            LOSSES[name] = LossType(fn, aggregation or name, **flags)
        return fn

    return add


def register(table: dict, name: str):
    def add(fn):
        table[name] = fn
        return fn

    return add


def loss_type(name: str) -> LossType:
    if name not in LOSSES:
        raise TunelabError(f"method.module.loss_type={name!r}; use one of {', '.join(LOSSES)}")
    return LOSSES[name]


# ---------------------------------------------------------------- importance weights


@register(IMPORTANCE_SAMPLING_LEVELS, "token")
def token_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return log_ratio


@register(IMPORTANCE_SAMPLING_LEVELS, "sequence")
def sequence_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025): the mean log-ratio over a completion's tokens, one weight per completion."""
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


@register(IMPORTANCE_SAMPLING_LEVELS, "sequence_sum")
def sequence_sum_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's RLOOTrainer: the summed log-ratio, the ratio of the completion's likelihoods."""
    return (log_ratio * mask).sum(-1).unsqueeze(-1)


def log_importance_weights(x: LossInputs, level: str) -> torch.Tensor:
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise TunelabError(f"method.module.importance_sampling_level={level!r}; use one of "
                           f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    return IMPORTANCE_SAMPLING_LEVELS[level](x.logprobs - x.old_logprobs, x.mask)


def level_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the masked tokens, or over completions where there is one value each (TRL's logging)."""
    return values.mean() if values.shape[-1] == 1 else masked_mean(values, mask)


def ratio_stats(x: LossInputs, coef: torch.Tensor) -> dict:
    """The mean importance ratio and the approximate KL to the sampling policy (PPO's approxkl)."""
    return {"ratio": level_mean(coef, x.mask), "approxkl": 0.5 * masked_mean((x.logprobs - x.old_logprobs) ** 2, x.mask)}


# ---------------------------------------------------------------- per-token objectives


def clipped_token_loss(logprobs, old_logprobs, advantages, epsilon_low: float, epsilon_high: float):
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A) per token, r = exp(logprobs - old_logprobs), A per sequence."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    return -torch.min(ratio * adv, clipped * adv), ratio


@register_loss("grpo", "dr_grpo", "dapo", "bnpo", "luspo")
def clipped_surrogate(x: LossInputs, o: Options):
    """PPO's clipped surrogate (Schulman et al. 2017) with DAPO's clip-higher (epsilon_high) and INTELLECT-2's
    two-sided clip (delta), at the token or sequence level."""
    coef_1 = torch.exp(log_importance_weights(x, o.importance_sampling_level))
    coef_2 = torch.clamp(coef_1, 1 - o.epsilon_low, 1 + o.epsilon_up)
    if o.delta is not None:
        coef_1 = torch.clamp(coef_1, max=o.delta)
    adv = x.advantage_per_token()
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    low = ((coef_1 < 1 - o.epsilon_low) & (adv < 0)).float()
    high = ((coef_1 > 1 + o.epsilon_up) & (adv > 0)).float()
    return per_token, {"clip_ratio/low_mean": level_mean(low, x.mask), "clip_ratio/high_mean": level_mean(high, x.mask),
                       "clip_ratio/region_mean": level_mean(torch.maximum(low, high), x.mask), **ratio_stats(x, coef_1)}


@register_loss("cispo", aggregation="dapo")
def cispo(x: LossInputs, o: Options):
    """CISPO (MiniMax-M1, 2025): the importance weight clipped from above and detached, times A log p, so every
    token keeps a gradient (the clipped surrogate drops those outside the range). epsilon_high is the bound."""
    coef_1 = torch.exp(log_importance_weights(x, o.importance_sampling_level))
    adv = x.advantage_per_token()
    per_token = -torch.clamp(coef_1, max=o.epsilon_up).detach() * adv * x.logprobs
    clipped = ((coef_1 > o.epsilon_up) & (adv > 0)).float()
    return per_token, {"cispo_clip_ratio": level_mean(clipped, x.mask), **ratio_stats(x, coef_1)}


@register_loss("sapo", aggregation="grpo")
def sapo(x: LossInputs, o: Options):
    """SAPO (Gao et al. 2025): a smooth gate sigmoid(tau (r - 1)) 4/tau in place of the hard clip, its slope 1 at
    r = 1; tau is sapo_temperature_pos for positive advantages, sapo_temperature_neg otherwise."""
    coef_1 = torch.exp(log_importance_weights(x, o.importance_sampling_level))
    adv = x.advantage_per_token()
    temperatures = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
    per_token = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * adv
    return per_token, ratio_stats(x, coef_1)


@register_loss("jsd", aggregation="dapo", kl_penalty=False, uses_ratio=False, needs_advantages=False,
               needs_reference_logits=True)
def generalized_jsd(x: LossInputs, o: Options):
    """On-policy distillation (Agarwal et al. 2024, TRL's DistillationTrainer): the generalised Jensen-Shannon
    divergence between the policy's and the reference's (the teacher's) next-token distributions on every sampled
    token, both at the sampling temperature; beta 0 is KL(teacher || student), 1 is KL(student || teacher).
    Departs from TRL in memory only: TRL never builds the (B, T, V) logits (chunked kernels); here they are built."""
    student = torch.log_softmax(x.logits.float(), -1)
    teacher = torch.log_softmax(x.reference_logits().float(), -1)
    beta = o.beta
    if beta == 0.0:
        per_token = (teacher.exp() * (teacher - student)).sum(-1)
    elif beta == 1.0:
        per_token = (student.exp() * (student - teacher)).sum(-1)
    else:
        mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
        per_token = (beta * (teacher.exp() * (teacher - mixture)).sum(-1)
                     + (1 - beta) * (student.exp() * (student - mixture)).sum(-1))
    return per_token, {}


# ---------------------------------------------------------------- aggregation (TRL's normalisers)


@register(AGGREGATIONS, "grpo")
def sequence_mean(per_token, mask, max_completion_length, normaliser):
    """Each completion's mean over its tokens, then the mean over completions (favours short answers)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@register(AGGREGATIONS, "bnpo")
def token_mean(per_token, mask, max_completion_length, normaliser):
    """The mean over this minibatch's tokens (PPO's masked mean)."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@register(AGGREGATIONS, "dr_grpo")
def constant_normaliser(per_token, mask, max_completion_length, normaliser):
    """The sum over a constant, completions x max_completion_length (Dr. GRPO: no length bias)."""
    return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)


@register(AGGREGATIONS, "dapo")
def global_token_mean(per_token, mask, max_completion_length, normaliser):
    """The sum over the tokens of the minibatch on every rank (`normaliser`, per rank: DDP averages)."""
    total = (per_token * mask).sum()
    normaliser = mask.sum() if normaliser is None else normaliser
    return total / torch.as_tensor(normaliser, dtype=total.dtype).clamp(min=1.0)


@register(AGGREGATIONS, "luspo")
def sequence_sum(per_token, mask, max_completion_length, normaliser):
    """LUSPO: each completion's loss summed over its tokens (its length scales it), then the mean."""
    return (per_token * mask).sum(-1).mean()


def aggregate(per_token_loss, mask, loss_type_name: str, max_completion_length: int, token_normaliser=None):
    """The loss type's aggregation of a per-token loss (B, T) or per-completion loss (B, 1) into one number."""
    return AGGREGATIONS[loss_type(loss_type_name).aggregation](per_token_loss, mask, max_completion_length,
                                                               token_normaliser)


def policy_objective(x: LossInputs, ref_logprobs: torch.Tensor | None, o: Options, token_normaliser=None):
    """(loss, stats) of one minibatch: the loss type's objective, + beta x KL per token when the KL goes in the loss
    (TRL adds it before aggregating), aggregated; stats hold `policy_loss` (without the KL) and the loss's own."""
    kind = loss_type(o.loss_type)
    per_token, stats = kind.fn(x, o)
    policy = aggregate(per_token, x.mask, o.loss_type, o.max_completion_length, token_normaliser)
    stats = {"policy_loss": policy, **stats}
    if not (kind.kl_penalty and o.beta != 0.0 and not o.use_kl_in_reward):
        return policy, stats
    kl = kl_per_token(x.logprobs, ref_logprobs, o.kl_estimator)
    stats["kl"] = masked_mean(kl, x.mask)
    return aggregate(per_token + o.beta * kl, x.mask, o.loss_type, o.max_completion_length, token_normaliser), stats
