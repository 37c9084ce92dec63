"""The one on-policy LightningModule: PPO, GRPO, RLOO and on-policy distillation are configs of it that differ
only in values (conf/method/{ppo,grpo,rloo,distill}.yaml).

Each training batch of prompts is one rollout: every prompt is repeated `num_generations` times, all completions
are sampled in one call (`generate`, the only place that samples), scored by the rewards, re-scored by the policy
(and the reference, and the critic) where the pieces need it, given advantages by the named estimator, then
trained on for `num_iterations` passes of `num_minibatches` optimizer steps (manual optimisation) with the named
loss. The pieces are registered functions: advantages.py, losses.py, kl.py, critic.py; their knobs options.py.

A group never leaves the rank that sampled it, so under DDP no group is split and advantages need no
communication (TRL gathers rewards over ranks instead; with `scale_rewards=batch` the std here is the rank's own
batch's). `trainer.max_steps` counts optimizer steps and is exact: the last rollout may get fewer updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from tunelab.core.logprobs import frozen_reference
from tunelab.core.tensors import masked_mean, position_ids, to_left_padding, unwrap
from tunelab.errors import TunelabError
from tunelab.methods.base import LanguageModelModule
from tunelab.methods.rewards import WeightedRewards, build_reward
from tunelab.methods.rl.advantages import SCALE_REWARDS, AdvantageInputs, estimator, group_std
from tunelab.methods.rl.collapse import CollapseWatch
from tunelab.methods.rl.critic import build_critic, explained_variance, is_head, value_loss, values_from
from tunelab.methods.rl.kl import KL_ESTIMATORS, AdaptiveKL, kl_per_token
from tunelab.methods.rl import losses
from tunelab.methods.rl.losses import IMPORTANCE_SAMPLING_LEVELS, LossInputs, policy_objective
from tunelab.methods.rl.options import NAMES, Options
from tunelab.methods.rl.rollout import (Rollout, check_vocabulary, load_reference, minibatch_indices,
                                        monitor_scores, score)

log = logging.getLogger("tunelab")
PHASES = ("generate", "score", "reference", "train")


class Forward(NamedTuple):
    logprobs: torch.Tensor           # (B, T) of the response tokens, at the sampling temperature
    entropy: torch.Tensor            # (B, T)
    logits: torch.Tensor             # (B, T, V) at the sampling temperature
    values: torch.Tensor | None      # (B, T) from the critic, when asked


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: log-probs at rollout and at update must come from the same function."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(unwrap(model), "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and getattr(config, name, None):
            setattr(config, name, 0.0)


def build_monitors(monitors) -> dict:
    """Callables logged per update and at evaluation, never trained on; a null entry removes one."""
    return {str(name): build_reward(str(name), cfg) for name, cfg in (monitors or {}).items() if cfg is not None}


def check_options(o: Options, has_rewards: bool) -> None:
    """Every combination the pieces cannot run is one line that says which knob to change."""
    if o.temperature <= 0:
        raise TunelabError(f"method.module.temperature={o.temperature} must be > 0 (the policy samples; the same "
                           "temperature scales every log-prob)")
    kind = losses.loss_type(o.loss_type)
    for value, table, name in ((o.kl_estimator, KL_ESTIMATORS, "kl_estimator"),
                               (o.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level"),
                               (o.scale_rewards, SCALE_REWARDS, "scale_rewards")):
        if value not in table:
            raise TunelabError(f"method.module.{name}={value!r}; use one of {', '.join(table)}")
    if o.num_generations is None or o.num_generations < 1:
        raise TunelabError(f"method.module.num_generations={o.num_generations}; sample at least 1 completion per prompt")
    if o.num_iterations < 1 or o.num_minibatches < 1:
        raise TunelabError("method.module.num_iterations and num_minibatches must be >= 1")
    if kind.kl_penalty is False and not 0.0 <= o.beta <= 1.0:
        raise TunelabError(f"method.module.beta={o.beta}: for loss_type={o.loss_type} it interpolates between "
                           "forward (0) and reverse (1) KL; give a value in [0, 1]")
    if o.advantage is None:
        if kind.needs_advantages:
            raise TunelabError(f"method.module.loss_type={o.loss_type} needs advantages; set method.module.advantage "
                               "(gae, group, leave_one_out, ...)")
        return
    est = estimator(o.advantage)
    if not has_rewards:
        raise TunelabError("no reward is set; give at least one under method.module.rewards")
    if est.needs_groups and o.num_generations < 2:
        raise TunelabError(f"method.module.num_generations={o.num_generations}; group-relative advantages need at "
                           f"least 2 completions per prompt (e.g. method.module.num_generations=4), or "
                           "method.module.advantage=gae with a critic")
    if est.needs_critic and not o.critic:
        raise TunelabError(f"method.module.advantage={o.advantage} needs a critic; set method.module.critic=head "
                           "(a value head on the policy) or a method=reward run dir")
    if o.kl_target is not None and not o.use_kl_in_reward:
        raise TunelabError("method.module.kl_target adapts the KL penalty in the reward (Ziegler et al.); set "
                           "method.module.use_kl_in_reward=true or kl_target=null")


class OnPolicyModule(LanguageModelModule):
    """Rollout -> advantages -> num_iterations x num_minibatches optimizer steps, with the pieces named by the config."""

    # PPO's own names before PPO, GRPO and RLOO became values of this one module, which takes TRL's GRPOConfig
    # names where a knob is shared; an old command gets one line with the new name.
    RENAMED_OPTIONS = {"kl_coef": "beta (TRL's GRPO name, shared by ppo, grpo and rloo)",
                       "cliprange": "epsilon (TRL's GRPO name, shared by ppo, grpo and rloo)",
                       "ppo_epochs": "num_iterations (TRL's GRPO name, shared by ppo, grpo and rloo)",
                       "max_new_tokens": "max_completion_length (TRL's GRPO name, shared by ppo, grpo and rloo)",
                       "reward": "rewards.score (named rewards, as grpo's: method.module.rewards.score._target_=...)",
                       "value_model": "critic (head, or a reward run dir to start the value model from)"}

    def __init__(self, model, optimizer, scheduler=None, *, rewards: dict | None = None,
                 reward_weights: list[float] | None = None, monitors: dict | None = None, log_prefix: str = "grpo",
                 log_samples: int = 4,
                 num_generations: int = 8, max_completion_length: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0,
                 advantage: str | None = "group", scale_rewards: str = "group", normalize_advantages: bool = False,
                 gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False, whiten_advantages: bool = True,
                 critic: str | None = None, vf_coef: float = 0.1, cliprange_value: float | None = 0.2,
                 loss_type: str = "dapo", importance_sampling_level: str = "token", epsilon: float = 0.2,
                 epsilon_high: float | None = None, delta: float | None = None, sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05,
                 beta: float = 0.0, use_kl_in_reward: bool = False, kl_estimator: str = "k3",
                 kl_target: float | None = None, kl_horizon: int = 10000, reference_model: str | None = None,
                 num_iterations: int = 1, num_minibatches: int = 1, shuffle_minibatches: bool = False,
                 mask_truncated_completions: bool = False, missing_eos_penalty: float | None = None,
                 score_clip: float | None = None, max_grad_norm: float | None = 1.0,
                 collapse_patience: int = 8, collapse_min_length: float | None = 1.5, stop_on_collapse: bool = False):
        arguments = locals()
        o = Options(**{name: arguments[name] for name in NAMES})
        check_options(o, has_rewards=bool(rewards) and any(v is not None for v in rewards.values()))
        # rewards first: a reward that does not resolve stops before any network is copied
        reward = WeightedRewards(rewards, reward_weights) if o.advantage is not None else None
        extra = build_monitors(monitors)
        super().__init__(model, optimizer, scheduler)
        self.automatic_optimization = False
        self.o, self.reward, self.monitors = o, reward, extra
        self.prefix, self.log_samples = log_prefix, log_samples
        self.loss_kind = losses.loss_type(o.loss_type)
        disable_dropout(model)
        self.critic = build_critic(model, o.critic)
        self.use_reference = (self.loss_kind.kl_penalty and o.beta != 0.0) or self.loss_kind.needs_reference_logits
        self.ref_model = self.build_reference(model, o.reference_model) if self.use_reference else None
        self.kl = AdaptiveKL(o.beta, o.kl_target, o.kl_horizon)
        self.collapse = CollapseWatch(o.collapse_patience, o.collapse_min_length)
        self.samples: list[dict] = []
        self.timings: dict[str, float] = {}
        self.rng_state: dict | None = None  # the sampling stream's state (see sampling_rng)
        self.token_counts = {"tokens_processed": 0, "generated_tokens": 0}  # since the last take_token_counts()

    @property
    def generation(self) -> dict:
        o = self.o
        return {"max_new_tokens": o.max_completion_length, "temperature": o.temperature, "top_k": o.top_k,
                "top_p": o.top_p}

    @staticmethod
    def build_reference(model, reference_model: str | None):
        """None: the adapter-disabled policy is the reference (a fresh LoRA); else a frozen network: the start point
        (a copy of a fully trained model, or the merged start where PiSSA/OLoRA left a residual under the adapter),
        or `reference_model` (a run dir, an HF folder or embedded:NAME; for distillation, the teacher)."""
        if not reference_model:
            return frozen_reference(model)
        reference = load_reference(reference_model)
        check_vocabulary(model, reference, reference_model)
        return reference

    @property
    def tokenizer(self):
        return self.trainer.datamodule.tokenizer

    def options_now(self) -> Options:
        """The options with beta as the adaptive controller has it now."""
        return self.o if self.kl.value == self.o.beta else dataclasses.replace(self.o, beta=self.kl.value)

    # ------------------------------------------------------------ timing

    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the block's wall time to this update's `name` phase (generate, score, reference, train)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def timing_metrics(self) -> dict[str, torch.Tensor]:
        """Seconds per phase of this update, and generation's share of them; the clock restarts."""
        total = sum(self.timings.values()) or 1.0
        logged = {f"time/{name}": torch.tensor(self.timings.get(name, 0.0)) for name in PHASES}
        logged["time/generate_share"] = torch.tensor(self.timings.get("generate", 0.0) / total)
        self.timings = {}
        return logged

    # ------------------------------------------------------------ sampling (the one place)

    @torch.no_grad()
    def generate(self, query, query_mask, do_sample: bool = True):
        """(responses with pad after the first EOS, their mask, whether each ended, the engine's log-probs of the
        sampled tokens at the sampling temperature or None) for every row in one batched call of the generation
        engine (core.generation: hf | vllm). The trainer re-scores every sampled token with the policy all the same."""
        from tunelab.core.generation import sample

        tok, g = self.tokenizer, self.generation
        precision = str(self.trainer.precision) if self._trainer is not None else None  # vLLM serves at it
        with self.phase("generate"), self.sampling_rng():
            samples = sample(self.model, query, query_mask, max_new_tokens=g["max_new_tokens"], do_sample=do_sample,
                             temperature=g["temperature"], top_k=g["top_k"], top_p=g["top_p"], precision=precision,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tokenizer=tok)
        self.token_counts["generated_tokens"] += int(samples.mask.sum())
        return tuple(samples)

    def take_token_counts(self) -> dict[str, int]:
        """Tokens trained on (every pass of every update) and sampled since the last call (TrainingSummary's)."""
        counts, self.token_counts = self.token_counts, dict.fromkeys(self.token_counts, 0)
        return counts

    def decode(self, response, mask) -> list[str]:
        return [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, mask)]

    def prompts_and_references(self, batch: dict):
        """Left-padded prompt ids, their texts and the references (None where the data has none)."""
        tok = self.tokenizer
        query, query_mask = to_left_padding(batch["input_ids"], batch["attention_mask"], tok.pad_token_id)
        prompts = batch.get("prompt") or [tok.decode(ids[m.bool()]) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        references = batch.get("reference") or [None] * len(query)
        return query, query_mask, prompts, references

    # ------------------------------------------------------------ scoring by the networks

    def forward_logits(self, model, query, query_mask, response, mask, hidden: bool = False):
        """(log-probs of the response tokens at the sampling temperature, entropies, model output, logits)."""
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        ids = torch.cat([query, response], 1)
        attention = torch.cat([query_mask, mask], 1)
        if torch.is_grad_enabled():  # a training pass (rollout and reference passes run under no_grad)
            self.token_counts["tokens_processed"] += int(attention.sum())
        out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention), use_cache=False,
                    output_hidden_states=hidden)
        logits = out.logits[:, query.shape[1] - 1 : -1].float() / self.o.temperature
        return selective_log_softmax(logits, response), entropy_from_logits(logits), out, logits

    def policy_forward(self, query, query_mask, response, mask, with_values: bool) -> Forward:
        head = with_values and is_head(self.critic)
        logprobs, entropy, out, logits = self.forward_logits(self.model, query, query_mask, response, mask, hidden=head)
        values = values_from(self.critic, out, query, query_mask, response, mask) if with_values else None
        return Forward(logprobs, entropy, logits, values)

    @torch.no_grad()
    def reference_forward(self, query, query_mask, response, mask):
        """(log-probs, logits) of the reference: the adapter-disabled policy or the frozen network."""
        if self.ref_model is None:
            with self.model.disable_adapter():
                out = self.forward_logits(self.model, query, query_mask, response, mask)
        else:
            out = self.forward_logits(self.ref_model, query, query_mask, response, mask)
        return out[0], out[3]

    def reference_logprobs(self, query, query_mask, response, mask):
        with self.phase("reference"):
            return self.reference_forward(query, query_mask, response, mask)[0]

    def reference_logits(self, r: Rollout, idx: torch.Tensor) -> torch.Tensor:
        """The reference's (B, T, V) logits of one minibatch, for a loss that reads its whole distribution."""
        with self.phase("reference"):
            return self.reference_forward(r.query[idx], r.query_mask[idx], r.response[idx], r.mask[idx])[1]

    def needs_sampling_logprobs(self) -> bool:
        """The sampling policy's log-probs (and values) are taken at rollout only where something reads them before
        the policy moves: several updates per rollout, a critic, or the KL in the reward; else old = the first
        pass's own, detached (TRL)."""
        o = self.o
        return ((self.loss_kind.uses_ratio and o.updates_per_rollout > 1) or self.critic is not None
                or (o.use_kl_in_reward and self.use_reference and self.loss_kind.kl_penalty))

    @torch.no_grad()
    def sampling_logprobs(self, query, query_mask, response, mask):
        """(log-probs, values) of the policy that sampled, in the chunks the first pass uses (same numbers)."""
        with self.phase("train"):
            parts = [self.policy_forward(query[i], query_mask[i], response[i], mask[i], self.critic is not None)
                     for i in self.minibatches(len(query), shuffle=False)]
        values = torch.cat([p.values for p in parts]) if self.critic is not None else None
        return torch.cat([p.logprobs for p in parts]), values

    # ------------------------------------------------------------ one rollout

    def rollout(self, batch: dict) -> Rollout:
        o = self.o
        query, query_mask, prompts, references = self.prompts_and_references(batch)
        k = o.num_generations
        if k > 1:
            query, query_mask = query.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0)
            prompts, references = [p for p in prompts for _ in range(k)], [r for r in references for _ in range(k)]
        response, mask, has_eos, engine_logprobs = self.generate(query, query_mask)
        texts = self.decode(response, mask)
        loss_mask = mask * has_eos.unsqueeze(1).long() if o.mask_truncated_completions else mask
        with self.phase("score"):
            scores, rewards = score(self.reward, prompts, texts, references, has_eos, o.missing_eos_penalty,
                                    o.score_clip)
        old, values = self.sampling_logprobs(query, query_mask, response, mask) if self.needs_sampling_logprobs() \
            else (None, None)
        ref = self.reference_logprobs(query, query_mask, response, mask) \
            if self.use_reference and self.loss_kind.kl_penalty else None
        r = Rollout(query, query_mask, response, mask, loss_mask, has_eos, texts, prompts, references,
                    {name: s.to(self.device) for name, s in scores.items()}, rewards.to(self.device), old, ref,
                    values, engine_logprobs)
        if o.use_kl_in_reward and ref is not None:
            r.kl = kl_per_token(old, ref, o.kl_estimator) * mask.float()
        if o.advantage is not None:
            inputs = AdvantageInputs(r.rewards, mask.float(), r.kl, self.kl.value, values, k)
            r.advantages, r.returns = estimator(o.advantage).fn(inputs, o)
        return r

    def minibatches(self, size: int, shuffle: bool) -> list[torch.Tensor]:
        return minibatch_indices(size, self.o.num_generations, self.o.num_minibatches, shuffle)

    # ------------------------------------------------------------ the update

    def steps_left(self) -> float:
        """Optimizer steps left before trainer.max_steps (inf without a limit): max_steps is exact."""
        max_steps = self.trainer.max_steps
        return math.inf if max_steps is None or max_steps < 0 else max_steps - self.trainer.global_step

    def token_normaliser(self, mask: torch.Tensor) -> torch.Tensor:
        """dapo: this minibatch's loss tokens summed over ranks, per rank (DDP then averages gradients)."""
        count = mask.sum().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            count = count.clone()
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return count

    def minibatch_loss(self, r: Rollout, idx: torch.Tensor, fwd: Forward, old: torch.Tensor, o: Options):
        """(loss, stats) of one minibatch: the named policy loss, + the KL in the loss, + vf_coef x the value loss."""
        mask = r.loss_mask[idx].float()
        x = LossInputs(fwd.logprobs, old, None if r.advantages is None else r.advantages[idx], mask, fwd.logits,
                       lambda: self.reference_logits(r, idx))
        normaliser = self.token_normaliser(mask) if self.loss_kind.aggregation == "dapo" else None
        loss, stats = policy_objective(x, None if r.ref_logprobs is None else r.ref_logprobs[idx], o, normaliser)
        if self.critic is not None:
            vf_loss, vf_clipfrac = value_loss(fwd.values, r.values[idx], r.returns[idx], mask, o.cliprange_value)
            loss = loss + o.vf_coef * vf_loss
            stats |= {"value_loss": vf_loss, "value_clipfrac": vf_clipfrac}
        return loss, stats

    def update(self, r: Rollout) -> dict[str, list[float]]:
        """num_iterations passes of num_minibatches optimizer steps over the rollout; their statistics."""
        o, stats = self.options_now(), {}
        for iteration in range(o.num_iterations):
            for number, idx in enumerate(self.minibatches(len(r), shuffle=o.shuffle_minibatches and iteration > 0)):
                if self.steps_left() <= 0:
                    return stats
                fwd = self.policy_forward(r.query[idx], r.query_mask[idx], r.response[idx], r.mask[idx],
                                          with_values=self.critic is not None)
                old = fwd.logprobs.detach() if r.old_logprobs is None else r.old_logprobs[idx]
                loss, step_stats = self.minibatch_loss(r, idx, fwd, old, o)
                self.optimizer_step_on(loss)
                m = r.mask[idx].float()
                for key, value in {"loss": loss, "entropy": masked_mean(fwd.entropy, m), **step_stats}.items():
                    stats.setdefault(key, []).append(float(value.detach()))
                if iteration == 0 and number == 0:  # the policy has not moved yet: what the trainer re-scored
                    stats |= self.first_pass_checks(r, idx, fwd.logprobs.detach(), old, m)
        return stats

    @staticmethod
    def first_pass_checks(r: Rollout, idx, logprobs, old, mask) -> dict[str, list[float]]:
        """The first ratio (exactly 1 unless a forward differs from the rollout's) and, where the generation engine
        reported its log-probs, their gap to the trainer's re-scoring of the same tokens (TRL's names)."""
        checks = {"first_ratio_max_deviation": [float((((logprobs - old).exp() - 1).abs() * mask).max())]}
        if r.engine_logprobs is not None:
            gap = (r.engine_logprobs[idx] - old).abs()
            checks["sampling/sampling_logp_difference/mean"] = [float(masked_mean(gap, mask))]
            checks["sampling/sampling_logp_difference/max"] = [float((gap * mask).max())]
        return checks

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        r = self.rollout(batch)
        with self.phase("train"):
            stats = self.update(r)
        self.log_update(r, stats)
        if r.kl is not None:
            self.kl.update(float(r.kl.sum(-1).mean()), len(r) * self.trainer.world_size)
        # The update's mean loss, for callbacks that trace training (tunelab-verify); already backpropagated.
        return {"loss": torch.tensor(sum(stats["loss"]) / len(stats["loss"]))} if stats.get("loss") else None

    # ------------------------------------------------------------ logging

    def reward_metrics(self, r: Rollout) -> dict[str, torch.Tensor]:
        """The reward's mean, each reward's, and (groups of 2 or more) their within-group std and the share of
        groups whose rewards are all equal (no learning signal)."""
        p, k = self.prefix, self.o.num_generations
        logged = {}
        if self.reward is not None:
            logged[f"{p}/reward"] = r.rewards.mean()
            for name, scores in r.scores.items():
                logged[f"{p}/rewards/{name}/mean"] = scores.mean()
                if k > 1:
                    logged[f"{p}/rewards/{name}/std"] = group_std(scores, k).mean()
            if k > 1:
                std = group_std(r.rewards, k)
                logged[f"{p}/reward_std"] = std.mean()
                logged[f"{p}/frac_reward_zero_std"] = torch.isclose(std, torch.zeros(())).float().mean()
        for name, values in monitor_scores(self.monitors, r.prompts, r.texts, r.references).items():
            logged[f"{p}/monitor_{name}"] = values.mean()
        return logged

    def log_update(self, r: Rollout, stats: dict[str, list[float]]) -> None:
        p, mask = self.prefix, r.mask.float()
        logged = self.reward_metrics(r) | {
            f"{p}/completion_length": mask.sum(-1).mean(),
            f"{p}/clipped_ratio": (~r.has_eos).float().mean(),  # completions cut at max_completion_length
            **{f"{p}/{k}": torch.tensor(sum(v) / len(v)) for k, v in stats.items()},
        }
        if r.kl is not None:  # in the reward: measured at sampling (in the loss: a statistic of each update)
            logged[f"{p}/kl"] = masked_mean(r.kl, mask)
        if self.use_reference and self.loss_kind.kl_penalty:
            logged[f"{p}/beta"] = torch.tensor(self.kl.value)
        if r.returns is not None:
            logged[f"{p}/explained_variance"] = explained_variance(r.values, r.returns, mask)
        logged |= self.timing_metrics()
        self.log_dict({k: torch.as_tensor(v).float().to(self.device) for k, v in logged.items()}, prog_bar=False,
                      batch_size=len(r))
        if self.reward is not None:
            self.log(f"{p}/mean_reward", r.rewards.mean(), prog_bar=True, batch_size=len(r))
        self.watch_collapse(logged.get(f"{p}/frac_reward_zero_std"), float(logged[f"{p}/completion_length"]))
        self.record_samples(r)

    def watch_collapse(self, zero_std_share, mean_length: float) -> None:
        """One warning line and `collapsed_at_step` (metrics.json: train/collapsed_at_step) when the run collapses."""
        share = None if zero_std_share is None else float(zero_std_share)
        if self.trainer.world_size > 1:  # one decision on every rank (a stop on one rank alone would hang DDP)
            both = torch.tensor([-1.0 if share is None else share, mean_length], device=self.device)
            both = self.trainer.strategy.reduce(both, reduce_op="mean")
            share, mean_length = (None if share is None else float(both[0])), float(both[1])
        if self.collapse.observe(self.global_step, share, mean_length) and self.trainer.is_global_zero:
            log.warning("collapsed at step %d: %s%s", self.global_step, self.collapse.reason,
                        "; stopping (method.module.stop_on_collapse=true)" if self.o.stop_on_collapse else
                        "; training goes on (method.module.stop_on_collapse=true stops it)")
        if self.collapse.collapsed_at is not None:
            self.log("collapsed_at_step", float(self.collapse.collapsed_at), batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.o.stop_on_collapse and self.collapse.collapsed_at is not None:
            self.stop_collapsed()

    def stop_collapsed(self) -> None:
        """Save a checkpoint at this step boundary and end the run as failed, with the command that resumes it."""
        trainer = self.trainer
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir, "checkpoints")
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path)
        raise TunelabError(f"collapsed at step {self.collapse.collapsed_at}: {self.collapse.reason}; stopped by "
                           f"method.module.stop_on_collapse=true; checkpoint saved to {path}; resume with: "
                           f"tunelab-train hydra.run.dir={trainer.default_root_dir} ckpt_path=auto")

    def record_samples(self, r: Rollout) -> None:
        """A few completions per update, to samples.jsonl in the run dir and as a W&B table when W&B logs."""
        if not self.log_samples or not self.trainer.is_global_zero:
            return
        k, per_completion = self.o.num_generations, r.advantages is not None and r.advantages.dim() == 1
        rows = []
        for i in range(min(self.log_samples, len(r))):
            row = {"step": self.global_step, **({"group": i // k} if k > 1 else {}), "prompt": r.prompts[i][-200:],
                   "response": r.texts[i], "reference": r.references[i], "reward": float(r.rewards[i])}
            row |= {"advantage": float(r.advantages[i])} if per_completion else {}
            rows.append(row | {name: float(s[i]) for name, s in r.scores.items()})
        self.samples += rows
        with (Path(self.trainer.default_root_dir) / "samples.jsonl").open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        for logger in self.loggers:
            if hasattr(logger, "log_table"):
                keys = list(rows[0])
                logger.log_table(key=f"{self.prefix}/samples", columns=keys,
                                 data=[[row.get(key) for key in keys] for row in self.samples])

    # ------------------------------------------------------------ optimisation

    def optimizer_step_on(self, loss: torch.Tensor) -> None:
        """One manual optimizer step: backward (averaged over DDP ranks), clipping, step, schedule."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        self.synced_backward(loss)
        if self.o.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.o.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    def synced_backward(self, loss: torch.Tensor) -> None:
        """Backward, then gradients averaged over DDP ranks.

        DDP syncs only the first backward after a forward through its wrapper, and an on-policy step makes
        several backwards per training_step, so the reducer is bypassed and every minibatch averaged here."""
        from torch.nn.parallel import DistributedDataParallel

        wrapped = getattr(self.trainer.strategy, "model", None)
        if not isinstance(wrapped, DistributedDataParallel):
            self.manual_backward(loss)
            return
        with wrapped.no_sync():
            self.manual_backward(loss)
        world = torch.distributed.get_world_size()
        for param in self.parameters():
            if param.requires_grad:
                if param.grad is None:  # a parameter unused on this rank still joins the average
                    param.grad = torch.zeros_like(param)
                torch.distributed.all_reduce(param.grad)
                param.grad.div_(world)

    def updates_per_rollout(self) -> int:
        return self.o.updates_per_rollout

    def scheduler_steps(self) -> int:
        # max_steps counts optimizer steps; otherwise each rollout batch makes updates_per_rollout() of them.
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return self.total_optimizer_steps() * self.updates_per_rollout()

    # ------------------------------------------------------------ the sampling RNG: its own stream per rank, saved in
    # checkpoints, so a resumed run samples what an uninterrupted one would (the global RNG is also drawn by data
    # loaders each time one starts an epoch)

    @contextlib.contextmanager
    def sampling_rng(self):
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            if self.rng_state is None:
                torch.manual_seed(torch.initial_seed() + 1000003 * self.global_rank)
            else:
                torch.set_rng_state(self.rng_state["cpu"])
                if cuda and self.rng_state.get("cuda") is not None:
                    torch.cuda.set_rng_state(self.rng_state["cuda"], self.device)
            yield
            self.rng_state = {"cpu": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_beta"] = self.kl.value  # the adaptive controller's state, so a resume continues it
        if self.rng_state is None:
            return
        for kind, state in self.rng_state.items():
            if state is None:
                continue
            if self.trainer.world_size > 1:  # every rank keeps its own stream (the hook runs on all ranks)
                state = self.all_gather(state.to(self.device)).cpu()
            checkpoint[f"sampling_rng_{kind}"] = state.reshape(self.trainer.world_size, -1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl.value = checkpoint.get("kl_beta", self.kl.value)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        states = {kind: checkpoint.get(f"sampling_rng_{kind}") for kind in ("cpu", "cuda")}
        if states["cpu"] is not None and rank < len(states["cpu"]):
            self.rng_state = {kind: None if s is None else s[rank].clone() for kind, s in states.items()}

    def on_fit_start(self) -> None:
        for fn in [self.reward, *self.monitors.values()]:
            if hasattr(fn, "to"):
                fn.to(self.device)
        Path(self.trainer.default_root_dir, "samples.jsonl").unlink(missing_ok=True)
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size and batch_size % self.o.num_minibatches:
            raise TunelabError(f"data.batch_size={batch_size} prompts does not divide into method.module."
                               f"num_minibatches={self.o.num_minibatches} whole groups; make it a multiple")
