"""PPO for language models (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details of
RLHF with PPO") as a Lightning module with manual optimization: each training batch of prompts is
one rollout followed by `ppo_epochs` passes of `num_minibatches` optimizer steps.

The maths lives in small functions (rewards with the KL penalty, GAE, whitening, the clipped losses)
so that each can be checked by hand; the module only sequences them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tunelab.core.inference import autocast
from tunelab.errors import TunelabError
from tunelab.eval.result import EvalResult
from tunelab.methods.online import (OnPolicyModule, active, disable_dropout, masked_mean, response_mask,  # noqa: F401
                                    to_left_padding)
from tunelab.core.tensors import position_ids, unwrap
from tunelab.methods.reward_model import HEAD
from tunelab.methods.rewards import check_scores, describe

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- maths


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    count = mask.sum()
    return var * count / (count - 1) if unbiased and count > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions only; the rest is left as it was."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, x)


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


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from sampled tokens (Schulman's k1/k2/k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise TunelabError(f"method.module.kl_estimator={estimator!r}; use k1, k2 or k3")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """-beta * KL on every response token, plus the sequence score on its last response token."""
    rewards = -beta * kl * mask
    last = last_index(mask)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return rewards


def last_index(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(-1).long() - 1).clamp(min=0)


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """The clipped surrogate; also returns the ratio, clip fraction and approx KL for logging."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
             "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, cliprange_value: float | None):
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped kept within cliprange_value of the old value."""
    losses = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * masked_mean(losses, mask), torch.zeros(())
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped_losses = (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(losses, clipped_losses), mask), masked_mean(
        (clipped_losses > losses).float(), mask)


def explained_variance(values, returns, mask) -> torch.Tensor:
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


class AdaptiveKL:
    """beta fixed, or adapted towards a target KL (Ziegler et al. 2019) when `target` is set."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon


# ---------------------------------------------------------------- the module


@dataclass
class Rollout:
    query: torch.Tensor          # left-padded prompts
    query_mask: torch.Tensor
    response: torch.Tensor       # generated tokens (pad after the first EOS)
    mask: torch.Tensor           # response tokens up to and including the first EOS
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    has_eos: torch.Tensor
    texts: list[str]


class PPOModule(OnPolicyModule):
    """Policy (the `model`), a frozen reference, a value function, and a reward callable."""

    prefix = "ppo"

    def __init__(self, model, optimizer, scheduler=None, *, reward, monitors: dict | None = None,
                 value_model: str | None = None, max_new_tokens: int = 32, temperature: float = 0.7,
                 top_k: int = 0, top_p: float = 1.0, kl_coef: float = 0.05, kl_target: float | None = None,
                 kl_horizon: int = 10000, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                 whiten_advantages: bool = True, whiten_rewards: bool = False, cliprange: float = 0.2,
                 cliprange_value: float | None = 0.2, vf_coef: float = 0.1, ppo_epochs: int = 4,
                 num_minibatches: int = 1, missing_eos_penalty: float | None = 1.0, score_clip: float | None = None,
                 max_grad_norm: float | None = 1.0, log_samples: int = 4):
        super().__init__(model, optimizer, scheduler, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, log_samples=log_samples, max_grad_norm=max_grad_norm)
        self.reward_fn, self.monitors = reward, active(monitors)
        self.kl = AdaptiveKL(kl_coef, kl_target, kl_horizon)
        self.kl_estimator, self.gamma, self.lam = kl_estimator, gamma, lam
        self.whiten_advantages, self.whiten_rewards = whiten_advantages, whiten_rewards
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.ppo_epochs, self.num_minibatches = ppo_epochs, num_minibatches
        self.missing_eos_penalty, self.score_clip = missing_eos_penalty, score_clip
        self.value_net = self.build_value(model, value_model)

    # -- the networks

    @staticmethod
    def build_value(model, value_model: str | None):
        """A linear head on the policy's last hidden state, or a trainable copy of a reward model."""
        if value_model in (None, "", "policy"):
            head = torch.nn.Linear(unwrap(model).config.hidden_size, 1)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
            return head
        from tunelab.methods.reward_model import load_reward_model

        value, _ = load_reward_model(value_model)
        disable_dropout(value)
        return value.requires_grad_(True).train()

    def forward_pass(self, model, query, query_mask, response, mask, with_values: bool):
        """Log-probs of the response tokens (at the sampling temperature), entropies, and values."""
        want_hidden = with_values and isinstance(self.value_net, torch.nn.Linear)
        logprobs, entropy, out, start = self.forward_logits(model, query, query_mask, response, mask, hidden=want_hidden)
        values = None
        if with_values:
            if want_hidden:
                values = self.value_net(out.hidden_states[-1][:, start:-1].to(self.value_net.weight.dtype)).squeeze(-1)
            else:
                ids, attention = torch.cat([query, response], 1), torch.cat([query_mask, mask], 1)
                inner = unwrap(self.value_net)
                hidden = getattr(inner, inner.base_model_prefix)(
                    input_ids=ids, attention_mask=attention, position_ids=position_ids(attention), use_cache=False
                ).last_hidden_state
                values = getattr(inner, HEAD)(hidden[:, start:-1]).squeeze(-1)
            values = values.float()
        return logprobs, entropy, values

    # -- rollout

    def score(self, prompts, texts, references, has_eos) -> torch.Tensor:
        with self.phase("score"):
            scores = check_scores(self.reward_fn(prompts=prompts, responses=texts, references=references), len(texts),
                                  describe(self.reward_fn)).to(self.device)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~has_eos).float()
        if self.score_clip is not None:
            scores = scores.clamp(-self.score_clip, self.score_clip)
        return scores

    def rollout(self, batch: dict) -> tuple[Rollout, list[str], list]:
        query, query_mask, prompts, references = self.prompts_and_references(batch)
        response, mask, has_eos, _ = self.generate(query, query_mask)
        texts = self.decode(response, mask)
        with torch.no_grad(), self.phase("train"):  # the old log-probs and values: the policy's own forward
            parts = [self.forward_pass(self.model, query[c], query_mask[c], response[c], mask[c], True)
                     for c in self.minibatches(len(query), shuffle=False)]
        logprobs = torch.cat([p[0] for p in parts])
        values = torch.cat([p[2] for p in parts])
        ref_logprobs = self.reference_logprobs(query, query_mask, response, mask)
        scores = self.score(prompts, texts, references, has_eos)
        return Rollout(query, query_mask, response, mask, logprobs, ref_logprobs, values, scores, has_eos, texts), \
            prompts, references

    def minibatches(self, size: int, shuffle: bool) -> list[torch.Tensor]:
        order = torch.randperm(size) if shuffle else torch.arange(size)
        if size % self.num_minibatches:
            raise TunelabError(f"batch of {size} prompts does not split into method.module.num_minibatches="
                               f"{self.num_minibatches}; make data.batch_size a multiple of it")
        return list(order.chunk(self.num_minibatches))

    # -- the update

    def advantages(self, r: Rollout):
        mask = r.mask.float()
        kl = kl_per_token(r.logprobs, r.ref_logprobs, self.kl_estimator) * mask
        rewards = token_rewards(r.scores, kl, mask, self.kl.value)
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, r.values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask
        return advantages, returns, kl

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        r, prompts, references = self.rollout(batch)
        advantages, returns, kl = self.advantages(r)
        mask = r.mask.float()
        stats: dict[str, list] = {}
        with self.phase("train"):
            for epoch in range(self.ppo_epochs):
                # The first epoch keeps rollout order, so its first minibatch repeats the rollout's forward
                # exactly and its ratio is 1.
                for number, idx in enumerate(self.minibatches(len(r.query), shuffle=epoch > 0)):
                    logprobs, entropy, values = self.forward_pass(self.model, r.query[idx], r.query_mask[idx],
                                                                  r.response[idx], r.mask[idx], with_values=True)
                    m = mask[idx]
                    pg_loss, pg_stats = policy_loss(logprobs, r.logprobs[idx], advantages[idx], m, self.cliprange)
                    vf_loss, vf_clipfrac = value_loss(values, r.values[idx], returns[idx], m, self.cliprange_value)
                    loss = pg_loss + self.vf_coef * vf_loss
                    self.optimizer_step_on(loss)
                    for key, value in {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss,
                                       "value_clipfrac": vf_clipfrac, "entropy": masked_mean(entropy, m),
                                       **pg_stats}.items():
                        stats.setdefault(key, []).append(float(value.detach()))
                    if epoch == 0 and number == 0:
                        deviation = ((logprobs - r.logprobs[idx]).exp() - 1).abs() * m
                        stats["first_ratio_max_deviation"] = [float(deviation.max().detach())]
        self.log_update(r, kl, returns, stats, prompts, references)
        self.kl.update(float((kl.sum(-1)).mean()), len(r.query) * self.trainer.world_size)
        # The update's mean loss, for callbacks that trace training (tunelab-verify); already backpropagated.
        return {"loss": torch.tensor(sum(stats["loss"]) / len(stats["loss"]))}

    def log_update(self, r: Rollout, kl, returns, stats, prompts, references) -> None:
        mask = r.mask.float()
        logged = {
            "ppo/score": r.scores.mean(),
            "ppo/kl": kl.sum(-1).mean(),
            "ppo/beta": torch.tensor(self.kl.value),
            "ppo/response_length": mask.sum(-1).mean(),
            "ppo/no_eos_fraction": (~r.has_eos).float().mean(),
            "ppo/explained_variance": explained_variance(r.values, returns, mask),
            **{f"ppo/{k}": torch.tensor(sum(v) / len(v)) for k, v in stats.items()},
        }
        for name, monitor in self.monitors.items():
            values = check_scores(monitor(prompts=prompts, responses=r.texts, references=references), len(r.texts), name)
            logged[f"ppo/monitor_{name}"] = values.mean()
        logged |= self.timing_metrics()
        self.log_dict({k: v.float().to(self.device) for k, v in logged.items()}, prog_bar=False, batch_size=len(r.query))
        self.log("ppo/mean_score", r.scores.mean(), prog_bar=True, batch_size=len(r.query))
        self.record_samples([{"prompt": p[-200:], "response": t, "reference": ref, "score": float(s)}
                             for p, t, ref, s in zip(prompts, r.texts, references, r.scores.tolist())])

    # -- optimisation and checkpoints

    def updates_per_rollout(self) -> int:
        return self.ppo_epochs * self.num_minibatches

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_kl_coef"] = self.kl.value  # the adaptive controller's state, so a resume continues it

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl.value = checkpoint.get("ppo_kl_coef", self.kl.value)

    def rewards_to_device(self) -> list:
        return [self.reward_fn]


# ---------------------------------------------------------------- evaluation


class PolicyEvaluator:
    """Greedy responses to held-out prompts, scored by the reward and each monitor (method=ppo's eval)."""

    def __init__(self, reward, monitors: dict | None = None, split: str = "test", max_examples: int | None = 64,
                 batch_size: int = 32, max_new_tokens: int = 32, precision: str | None = "auto",
                 compare_base: bool = True, generation: dict | None = None):
        self.reward, self.monitors = reward, active(monitors)
        self.split, self.max_examples, self.batch_size = split, max_examples, batch_size
        self.precision, self.compare_base = precision, compare_base
        # generate() arguments, spelled as eval=default spells them (eval.generation.max_new_tokens=...)
        self.generation = {"do_sample": False, "max_new_tokens": max_new_tokens, **(generation or {})}

    @torch.no_grad()
    def run(self, model, datamodule) -> EvalResult:
        examples = datamodule.examples.get(self.split, [])[: self.max_examples or None]
        if not examples:
            return EvalResult()
        tok = datamodule.tokenizer
        device = next(model.parameters()).device
        if hasattr(self.reward, "to"):
            self.reward.to(device)
        prompts = [datamodule.formatter.generation_prompt(list(e.prompt)) for e in examples]
        references = [e.reference for e in examples]
        texts, has_eos = [], []
        was_training = model.training
        model.eval()
        side, tok.padding_side = tok.padding_side, "left"
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = tok(prompts[start : start + self.batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
                with autocast(self.precision, device):
                    out = model.generate(**batch, **self.generation, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id)
                response = out[:, batch["input_ids"].shape[1] :]
                mask, eos = response_mask(response, tok.eos_token_id)
                texts += [tok.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, mask)]
                has_eos += eos.tolist()
        finally:
            tok.padding_side = side
            model.train(was_training)
        rows = [{"prompt": e.prompt[-1]["content"], "reference": ref, "prediction": t}
                for e, ref, t in zip(examples, references, texts)]
        metrics = {}
        for name, fn in {"reward": self.reward, **self.monitors}.items():
            scores = check_scores(fn(prompts=prompts, responses=texts, references=references), len(texts), name)
            metrics[f"{self.split}/{name}"] = scores.mean().item()
            for row, s in zip(rows, scores.tolist()):
                row[name] = s
        metrics[f"{self.split}/response_words"] = sum(len(t.split()) for t in texts) / len(texts)
        metrics[f"{self.split}/eos_fraction"] = sum(has_eos) / len(has_eos)
        return EvalResult(metrics, rows)
