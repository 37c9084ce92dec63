"""GRPO (Shao et al. 2024, DeepSeekMath) with TRL's loss variants, and RLOO (Ahmadian et al. 2024), on the
on-policy base shared with PPO. Option names and defaults follow TRL 1.x's `GRPOConfig`/`RLOOConfig`.

Each training batch of prompts is one generation batch: every prompt is repeated `num_generations`
times and all completions are sampled in one batched call, scored by the weighted rewards, turned into
group-relative advantages, then trained on for `num_iterations` x `num_minibatches` optimizer steps.
A group never leaves the rank that sampled it, so under DDP no group is split and advantages need no
communication (TRL gathers rewards over ranks instead; with `scale_rewards=batch` the std here is the
rank's own batch's).

Departures from TRL, on purpose: no vLLM, no importance-sampling correction (generation and training
are the same HF model at the same precision); `dapo`'s normaliser is the token count of the minibatch
summed over ranks (TRL: of the generation batch, divided over its accumulation steps), which is the same
when `num_minibatches=1`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.errors import TunelabError
from tunelab.methods.online import OnPolicyModule, active, masked_mean
from tunelab.methods.ppo import PolicyEvaluator
from tunelab.methods.rewards import WeightedRewards, build_rewards

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


# ---------------------------------------------------------------- maths


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


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference), Schulman's k3 estimator, as TRL's GRPO: >= 0, exactly 0 when equal."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def clipped_token_loss(logprobs, old_logprobs, advantages, epsilon_low: float, epsilon_high: float):
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A) per token, r = exp(logprobs - old_logprobs), A per sequence."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    return -torch.min(ratio * adv, clipped * adv), ratio


def aggregate(per_token_loss, mask, loss_type: str, max_completion_length: int, token_normaliser=None) -> torch.Tensor:
    """The loss normalisers of TRL's `GRPOTrainer._compute_loss`:

    grpo: each sequence's mean over its tokens, then the mean over sequences (favours short answers);
    bnpo: the mean over this batch's tokens; dr_grpo: the sum over a constant, batch x max_completion_length
    (no length bias); dapo: the sum over the tokens of the whole (global) batch, `token_normaliser`."""
    total = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        normaliser = mask.sum() if token_normaliser is None else token_normaliser
        return total / torch.as_tensor(normaliser, dtype=total.dtype).clamp(min=1.0)
    raise TunelabError(f"method.module.loss_type={loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


# ---------------------------------------------------------------- the module


@dataclass
class Generation:
    query: torch.Tensor          # left-padded prompts, each repeated num_generations times
    query_mask: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor           # response tokens up to and including the first EOS
    loss_mask: torch.Tensor      # mask, without truncated completions when mask_truncated_completions
    has_eos: torch.Tensor
    scores: dict                 # {reward name: (n,)}
    rewards: torch.Tensor        # the weighted sum
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    texts: list[str]
    prompts: list[str]
    references: list


class GRPOModule(OnPolicyModule):
    """Group sampling, group-relative advantages and TRL's clipped policy loss with its normalisers."""

    prefix = "grpo"

    def __init__(self, model, optimizer, scheduler=None, *, rewards, reward_weights: list[float] | None = None,
                 monitors: dict | None = None, num_generations: int = 8, loss_type: str = "dapo", beta: float = 0.0,
                 epsilon: float = 0.2, epsilon_high: float | None = None, num_iterations: int = 1,
                 scale_rewards: str = "group", mask_truncated_completions: bool = False,
                 max_completion_length: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 num_minibatches: int = 1, max_grad_norm: float | None = 1.0, log_samples: int = 4):
        check_options(num_generations, loss_type, scale_rewards, num_iterations, num_minibatches)
        reward = WeightedRewards(rewards, reward_weights)  # first: a reward that does not resolve stops at once
        super().__init__(model, optimizer, scheduler, max_new_tokens=max_completion_length, temperature=temperature,
                         top_k=top_k, top_p=top_p, log_samples=log_samples, max_grad_norm=max_grad_norm,
                         use_reference=beta != 0.0)
        self.reward = reward
        self.monitors = active(build_rewards(monitors) if monitors else {})
        self.num_generations, self.loss_type, self.beta = num_generations, loss_type, beta
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.num_iterations, self.num_minibatches = num_iterations, num_minibatches
        self.scale_rewards, self.mask_truncated_completions = scale_rewards, mask_truncated_completions
        self.max_completion_length = max_completion_length

    # -- one generation batch

    def advantages(self, rewards: torch.Tensor, g: Generation | None = None) -> torch.Tensor:
        return group_advantages(rewards, self.num_generations, self.scale_rewards)[0]

    def needs_old_logprobs(self) -> bool:
        """Only when the policy moves before a completion is trained on; else old = current, detached (TRL)."""
        return self.num_iterations > 1 or self.num_minibatches > 1

    def rollout(self, batch: dict) -> Generation:
        query, query_mask, prompts, references = self.prompts_and_references(batch)
        k = self.num_generations
        query, query_mask = query.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0)
        prompts, references = [p for p in prompts for _ in range(k)], [r for r in references for _ in range(k)]
        response, mask, has_eos, _ = self.generate(query, query_mask)
        texts = self.decode(response, mask)
        loss_mask = mask * has_eos.unsqueeze(1).long() if self.mask_truncated_completions else mask
        with self.phase("score"):
            scores = {name: s.to(self.device) for name, s in self.reward.scores(prompts, texts, references).items()}
            rewards = self.reward.total(scores)
        old = None
        if self.needs_old_logprobs():
            with torch.no_grad(), self.phase("train"):
                old = torch.cat([self.policy_logprobs(self.model, query[i], query_mask[i], response[i], mask[i])[0]
                                 for i in self.minibatches(len(query))])
        ref = self.reference_logprobs(query, query_mask, response, mask) if self.use_reference else None
        g = Generation(query, query_mask, response, mask, loss_mask, has_eos, scores, rewards, None, old, ref, texts,
                       prompts, references)
        g.advantages = self.advantages(rewards, g)
        return g

    def minibatches(self, size: int) -> list[torch.Tensor]:
        """Completion indices of each minibatch, whole groups in sampling order (so the first repeats the
        rollout's forward and its ratio is exactly 1)."""
        groups = size // self.num_generations
        if groups % self.num_minibatches:
            raise TunelabError(f"a batch of {groups} prompts ({size} completions) does not divide into "
                               f"method.module.num_minibatches={self.num_minibatches} whole groups; "
                               "make data.batch_size a multiple of it")
        return list(torch.arange(size).chunk(self.num_minibatches))

    # -- the loss

    def token_normaliser(self, mask: torch.Tensor) -> torch.Tensor:
        """dapo: this minibatch's loss tokens summed over ranks, per rank (DDP then averages gradients)."""
        count = mask.sum().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            count = count.clone()
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return count

    def loss(self, logprobs, old_logprobs, ref_logprobs, advantages, mask):
        """TRL's GRPO loss on one minibatch, and the statistics it logs."""
        mask = mask.float()
        per_token, ratio = clipped_token_loss(logprobs, old_logprobs, advantages, self.epsilon_low, self.epsilon_high)
        stats = {}
        if self.beta != 0.0:
            kl = k3_kl(logprobs, ref_logprobs)
            per_token = per_token + self.beta * kl
            stats["kl"] = masked_mean(kl, mask)
        normaliser = self.token_normaliser(mask) if self.loss_type == "dapo" else None
        loss = aggregate(per_token, mask, self.loss_type, self.max_completion_length, normaliser)
        adv = advantages.unsqueeze(1)
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).float()
        stats |= {"clip_ratio/low_mean": masked_mean(low, mask), "clip_ratio/high_mean": masked_mean(high, mask),
                  "clip_ratio/region_mean": masked_mean(low + high, mask)}
        return loss, stats

    # -- the update

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        g = self.rollout(batch)
        stats: dict[str, list] = {}
        with self.phase("train"):
            for iteration in range(self.num_iterations):
                for number, idx in enumerate(self.minibatches(len(g.query))):
                    logprobs, entropy = self.policy_logprobs(self.model, g.query[idx], g.query_mask[idx],
                                                             g.response[idx], g.mask[idx])
                    old = logprobs.detach() if g.old_logprobs is None else g.old_logprobs[idx]
                    ref = None if g.ref_logprobs is None else g.ref_logprobs[idx]
                    loss, step_stats = self.loss(logprobs, old, ref, g.advantages[idx], g.loss_mask[idx])
                    self.optimizer_step_on(loss)
                    m = g.mask[idx].float()
                    for key, value in {"loss": loss, "entropy": masked_mean(entropy, m), **step_stats}.items():
                        stats.setdefault(key, []).append(float(value.detach()))
                    if iteration == 0 and number == 0:
                        deviation = ((logprobs - old).exp() - 1).abs() * m
                        stats["first_ratio_max_deviation"] = [float(deviation.max().detach())]
        self.log_update(g, stats)
        # The update's mean loss, for callbacks that trace training (tunelab-verify); already backpropagated.
        return {"loss": torch.tensor(sum(stats["loss"]) / len(stats["loss"]))}

    def reward_metrics(self, g: Generation) -> dict[str, torch.Tensor]:
        """Each reward's mean and within-group std, and the share of groups with no learning signal."""
        k, p = self.num_generations, self.prefix
        logged = {f"{p}/reward": g.rewards.mean(), f"{p}/reward_std": group_std(g.rewards, k).mean(),
                  f"{p}/frac_reward_zero_std": torch.isclose(group_std(g.rewards, k), torch.zeros(())).float().mean()}
        for name, scores in g.scores.items():
            logged[f"{p}/rewards/{name}/mean"] = scores.mean()
            logged[f"{p}/rewards/{name}/std"] = group_std(scores, k).mean()
        for name, monitor in self.monitors.items():
            values = monitor(prompts=g.prompts, responses=g.texts, references=g.references)
            logged[f"{p}/monitor_{name}"] = torch.as_tensor(values, dtype=torch.float32).mean()
        return logged

    def log_update(self, g: Generation, stats: dict) -> None:
        p = self.prefix
        logged = self.reward_metrics(g) | {
            f"{p}/completion_length": g.mask.float().sum(-1).mean(),
            f"{p}/clipped_ratio": (~g.has_eos).float().mean(),  # completions cut at max_completion_length
            **{f"{p}/{k}": torch.tensor(sum(v) / len(v)) for k, v in stats.items()},
        } | self.timing_metrics()
        self.log_dict({k: torch.as_tensor(v).float().to(self.device) for k, v in logged.items()}, prog_bar=False,
                      batch_size=len(g.query))
        self.log(f"{p}/mean_reward", g.rewards.mean(), prog_bar=True, batch_size=len(g.query))
        self.record_samples([
            {"group": i // self.num_generations, "prompt": prompt[-200:], "response": text, "reference": ref,
             "reward": float(reward), "advantage": float(adv), **{n: float(s[i]) for n, s in g.scores.items()}}
            for i, (prompt, text, ref, reward, adv) in enumerate(zip(g.prompts, g.texts, g.references, g.rewards,
                                                                       g.advantages))])

    def updates_per_rollout(self) -> int:
        return self.num_iterations * self.num_minibatches

    def rewards_to_device(self) -> list:
        return [self.reward]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size and batch_size % self.num_minibatches:
            raise TunelabError(f"data.batch_size={batch_size} prompts does not divide into method.module."
                               f"num_minibatches={self.num_minibatches} whole groups; make it a multiple")


class RLOOModule(GRPOModule):
    """RLOO as TRL's RLOOTrainer: k samples per prompt, advantage = reward minus the mean of the other k-1,
    the KL to the reference (k1, summed over the sequence) subtracted from the reward, and a clipped
    sequence-level ratio of summed log-probs averaged over completions."""

    prefix = "rloo"

    def __init__(self, *args, normalize_advantages: bool = False, num_generations: int = 2, beta: float = 0.05,
                 **kwargs):
        kwargs.setdefault("loss_type", "grpo")  # unused: RLOO's loss is sequence-level
        super().__init__(*args, num_generations=num_generations, beta=beta, **kwargs)
        self.normalize_advantages = normalize_advantages

    def needs_old_logprobs(self) -> bool:
        return super().needs_old_logprobs() or self.beta != 0.0  # the KL penalty is taken at sampling time

    def advantages(self, rewards: torch.Tensor, g: Generation | None = None) -> torch.Tensor:
        if self.beta != 0.0 and g is not None:
            kl = ((g.old_logprobs - g.ref_logprobs) * g.mask).sum(-1)
            rewards = rewards - self.beta * kl
        return rloo_advantages(rewards, self.num_generations, self.normalize_advantages)

    def loss(self, logprobs, old_logprobs, ref_logprobs, advantages, mask):
        mask = mask.float()
        log_ratio = ((logprobs - old_logprobs) * mask).sum(-1)
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        loss = -torch.min(ratio * advantages, clipped * advantages).mean()
        stats = {"clip_ratio/region_mean": ((ratio - clipped).abs() > 0).float().mean()}
        if ref_logprobs is not None:
            stats["kl"] = ((logprobs - ref_logprobs) * mask).sum(-1).mean()
        return loss, stats


def check_options(num_generations: int, loss_type: str, scale_rewards: str, num_iterations: int,
                  num_minibatches: int) -> None:
    if num_generations is None or num_generations < 2:
        raise TunelabError(f"method.module.num_generations={num_generations}; group-relative advantages need at "
                           "least 2 completions per prompt (e.g. method.module.num_generations=4)")
    if loss_type not in LOSS_TYPES:
        raise TunelabError(f"method.module.loss_type={loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if scale_rewards not in SCALE_REWARDS:
        raise TunelabError(f"method.module.scale_rewards={scale_rewards!r}; use one of {', '.join(SCALE_REWARDS)}")
    if num_iterations < 1 or num_minibatches < 1:
        raise TunelabError("method.module.num_iterations and num_minibatches must be >= 1")


# ---------------------------------------------------------------- evaluation


class GroupPolicyEvaluator(PolicyEvaluator):
    """Greedy answers to held-out prompts, scored by the weighted reward (`test/reward`) and by each
    reward on its own (`test/<name>`: with the shipped arithmetic task, `test/correct` is accuracy)."""

    def __init__(self, rewards, reward_weights: list[float] | None = None, monitors: dict | None = None, **kwargs):
        total = WeightedRewards(rewards, reward_weights)
        extra = active(build_rewards(monitors)) if monitors else {}
        super().__init__(total, {**total.rewards, **extra}, **kwargs)
