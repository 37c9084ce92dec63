"""The knobs of the on-policy module, as one typed, frozen record that every registered piece reads.

Names are TRL 1.16's where TRL has the knob (`GRPOConfig`, `RLOOConfig`, `DistillationConfig`), PPO's (Ziegler et
al.; TRL's old `PPOConfig`) for what only PPO has, verl's for what neither has (`use_kl_in_reward`). The defaults
live in `OnPolicyModule.__init__`'s signature (the documented surface a config sets); `defaults()` reads them.
"""

from __future__ import annotations

import dataclasses
import inspect


@dataclasses.dataclass(frozen=True)
class Options:
    # -- sampling: completions per prompt (1: PPO's one response per prompt), their length and temperature
    num_generations: int
    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int
    # -- advantages (advantages.py): the estimator by name, and what each one reads
    advantage: str | None               # gae | group | leave_one_out | reinforce_baseline | null (a loss that needs none)
    scale_rewards: str                  # group: divide by the std of the group, the batch, or none (Dr. GRPO)
    normalize_advantages: bool          # leave_one_out: whiten over the batch (TRL's RLOO)
    gamma: float                        # gae
    lam: float                          # gae
    whiten_rewards: bool                # gae: token rewards whitened over the batch (mean kept)
    whiten_advantages: bool             # gae: advantages whitened over the response tokens
    # -- critic (critic.py): null, `head` (a linear value head on the policy) or a method=reward run dir
    critic: str | None
    vf_coef: float
    cliprange_value: float | None
    # -- policy loss (losses.py): TRL's loss_type and importance_sampling_level, the clip range
    loss_type: str
    importance_sampling_level: str      # token | sequence (GSPO: mean log-ratio) | sequence_sum (RLOO: summed)
    epsilon: float
    epsilon_high: float | None          # null: epsilon (cispo: the upper bound of the clipped weight, ScaleRL's 5.0)
    delta: float | None                 # two-sided clipping of the ratio from above (INTELLECT-2)
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    # -- the reference (kl.py): beta is the KL coefficient of the policy-gradient losses, and of the
    # generalised JSD the interpolation between forward (0) and reverse (1) KL (TRL's DistillationConfig)
    beta: float
    use_kl_in_reward: bool              # true: -beta * KL in the reward (PPO, RLOO); false: + beta * KL in the loss (GRPO)
    kl_estimator: str                   # k1 | k2 | k3
    kl_target: float | None             # set: beta adapts towards this KL per sequence (Ziegler et al. 2019)
    kl_horizon: int
    reference_model: str | None         # null: the start of the policy; a run dir, an HF folder or embedded:NAME
    # -- the update: passes over each rollout, optimizer steps per pass (whole groups each), and their order
    num_iterations: int
    num_minibatches: int
    shuffle_minibatches: bool           # passes after the first visit the groups in a new order (PPO's epochs)
    mask_truncated_completions: bool
    missing_eos_penalty: float | None   # subtracted from the reward of a completion with no EOS
    score_clip: float | None            # rewards clipped to [-c, c]
    max_grad_norm: float | None
    # -- collapse (collapse.py): how long all-equal rewards or too short completions may last
    collapse_patience: int              # 0: never marked collapsed
    collapse_min_length: float | None
    stop_on_collapse: bool

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_up(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def updates_per_rollout(self) -> int:
        return self.num_iterations * self.num_minibatches


NAMES = tuple(f.name for f in dataclasses.fields(Options))


def defaults(**changes) -> Options:
    """The module's defaults with `changes` (for tests and for code that builds the pieces alone)."""
    from tunelab.methods.rl.module import OnPolicyModule

    signature = inspect.signature(OnPolicyModule.__init__).parameters
    return Options(**{name: signature[name].default for name in NAMES} | changes)
