"""On-policy RL as one engine: one LightningModule (module.py) running registered pieces, picked by config value.

    advantages.py  estimators by name: gae (with a critic), group (GRPO), leave_one_out (RLOO), reinforce_baseline
    losses.py      policy losses by TRL's loss_type (grpo, dr_grpo, dapo, bnpo, luspo, cispo, sapo) and
                   importance_sampling_level (token, sequence = GSPO, sequence_sum = RLOO), and jsd (distillation)
    kl.py          KL estimators k1/k2/k3, in the reward or in the loss, and the adaptive coefficient
    critic.py      the optional value head or value model, and the value loss
    rollout.py     what a rollout holds, scoring, minibatches, the reference
    collapse.py    telling a collapsed run
    evaluator.py   greedy answers to held-out prompts, scored by rewards

method=ppo, grpo, rloo and distill are configs of `OnPolicyModule` that differ only in values.
"""

from tunelab.methods.rl.evaluator import GroupPolicyEvaluator, PolicyEvaluator
from tunelab.methods.rl.module import OnPolicyModule

__all__ = ["GroupPolicyEvaluator", "OnPolicyModule", "PolicyEvaluator"]
