"""The registered pieces of the on-policy module (methods/rl/), each against a hand-computed value or TRL's own
formula: every advantage estimator, policy loss, aggregation, importance-sampling level and KL estimator that is
registered has its test here (the last test fails when one is added without one)."""

from __future__ import annotations

import pytest
import torch

from tunelab.methods.rl.advantages import ADVANTAGES, AdvantageInputs
from tunelab.methods.rl.kl import KL_ESTIMATORS, kl_per_token
from tunelab.methods.rl.losses import (AGGREGATIONS, IMPORTANCE_SAMPLING_LEVELS, LOSSES, LossInputs,
                                       log_importance_weights, policy_objective)
from tunelab.methods.rl.options import defaults

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # lengths 3, 1, 4
TESTED = {"advantages": {"gae", "group", "leave_one_out", "reinforce_baseline"},
          "losses": {"grpo", "dr_grpo", "dapo", "bnpo", "luspo", "cispo", "sapo", "jsd"},
          "aggregations": {"grpo", "dr_grpo", "dapo", "bnpo", "luspo"},
          "levels": {"token", "sequence", "sequence_sum"}, "kl": {"k1", "k2", "k3"}}


def trl_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, *, loss_type, beta,
             importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2, delta=None,
             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, max_completion_length=4):
    """Transcribed from TRL 1.16 `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py): one process, no
    gradient accumulation, no vLLM correction, no entropy mask or bonus; num_items_in_batch = the mask's sum."""
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ["grpo", "sapo"]:
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type in ["cispo", "dapo"]:
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum(-1).mean()  # luspo


def sampled_logprobs(seed: int = 0, requires_grad: bool = False):
    torch.manual_seed(seed)
    logps = (-torch.rand(3, 4) * 3).requires_grad_(requires_grad)
    old = logps.detach() + 0.4 * torch.randn(3, 4)  # ratios inside and outside every clip range
    ref = logps.detach() + 0.5 * torch.randn(3, 4)
    return logps, old, ref, torch.tensor([1.3, -0.7, 0.4])


# TRL 1.16's GRPOConfig defaults and the values its docs recommend: GSPO (importance_sampling_level=sequence) with
# TRL's grpo loss, CISPO with ScaleRL's epsilon_high=5.0, SAPO's temperatures, LUSPO on sequence-level ratios.
CASES = [
    ("grpo", {}), ("dapo", {"epsilon_high": 0.28}), ("bnpo", {"delta": 1.5}), ("dr_grpo", {}),
    ("grpo", {"importance_sampling_level": "sequence"}),                        # GSPO
    ("dapo", {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4}),  # GSPO's paper ranges
    ("cispo", {"epsilon_high": 5.0}), ("cispo", {"epsilon_high": 1.2, "importance_sampling_level": "sequence"}),
    ("sapo", {}), ("sapo", {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0}),
    ("luspo", {"importance_sampling_level": "sequence"}),
]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type, options", CASES)
def test_each_policy_loss_is_trls_on_identical_inputs_value_and_gradient(loss_type, options, beta):
    o = defaults(loss_type=loss_type, beta=beta, max_completion_length=4, **options)
    logps, old, ref, advantages = sampled_logprobs(requires_grad=True)
    ours, _ = policy_objective(LossInputs(logps, old, advantages, MASK), ref, o)
    (our_grad,) = torch.autograd.grad(ours, logps)
    theirs = trl_loss(logps, old, ref, advantages, MASK, loss_type=loss_type, beta=beta,
                      importance_sampling_level=o.importance_sampling_level, epsilon_low=o.epsilon_low,
                      epsilon_high=o.epsilon_up, delta=o.delta, sapo_temperature_pos=o.sapo_temperature_pos,
                      sapo_temperature_neg=o.sapo_temperature_neg)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(our_grad, their_grad, rtol=1e-5, atol=1e-7)
    assert our_grad.abs().sum() > 0  # a loss with no gradient would pass the value check alone


def test_trl_defaults_are_the_modules():
    """The names and defaults the TRL-formula test assumes are TRL 1.16's own."""
    import dataclasses

    from trl import GRPOConfig

    trl_defaults, ours = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}, defaults()
    for name in ("loss_type", "beta", "epsilon", "epsilon_high", "delta", "importance_sampling_level",
                 "sapo_temperature_pos", "sapo_temperature_neg", "num_iterations", "scale_rewards", "temperature",
                 "top_p", "mask_truncated_completions"):
        assert getattr(ours, name) == trl_defaults[name], name


def test_gspo_ratio_is_the_geometric_mean_and_rloos_the_product_of_token_ratios():
    logps, old, _, advantages = sampled_logprobs()
    x = LossInputs(logps, old, advantages, MASK)
    ratios = torch.exp(logps - old)
    for row, n in enumerate([3, 1, 4]):
        token_ratios = ratios[row, :n]
        assert torch.exp(log_importance_weights(x, "sequence")[row, 0]).item() == pytest.approx(
            token_ratios.prod().item() ** (1 / n), rel=1e-5)
        assert torch.exp(log_importance_weights(x, "sequence_sum")[row, 0]).item() == pytest.approx(
            token_ratios.prod().item(), rel=1e-5)
    assert torch.equal(log_importance_weights(x, "token"), logps - old)


def test_cispo_keeps_a_gradient_where_the_clipped_surrogate_drops_it():
    """At a ratio above 1 + epsilon with a positive advantage the clipped surrogate is flat; CISPO's is not."""
    logps = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    x = LossInputs(logps, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    clip, _ = policy_objective(x, None, defaults(loss_type="bnpo"))
    cispo, stats = policy_objective(x, None, defaults(loss_type="cispo", epsilon_high=1.2))
    assert torch.autograd.grad(clip, logps)[0].item() == 0.0
    assert torch.autograd.grad(cispo, logps)[0].item() == pytest.approx(-1.2)  # -min(r, 1.2) * A
    assert stats["cispo_clip_ratio"].item() == 1.0


def test_sapo_gate_has_slope_one_at_ratio_one_and_saturates():
    logps = torch.zeros(1, 1, requires_grad=True)
    x = LossInputs(logps, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    loss, _ = policy_objective(x, None, defaults(loss_type="sapo"))
    assert torch.autograd.grad(loss, logps)[0].item() == pytest.approx(-1.0)  # as the unclipped surrogate at r = 1
    far = LossInputs(torch.full((1, 1), 3.0, requires_grad=True), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    loss, _ = policy_objective(far, None, defaults(loss_type="sapo"))
    assert abs(torch.autograd.grad(loss, far.logprobs)[0].item()) < 0.01  # r = e^3: the gate has closed


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [1.0, 1.0, 1.0, 1.0]])
    agg = {name: fn(per_token, MASK, 8, None).item() for name, fn in AGGREGATIONS.items()}
    assert agg["grpo"] == pytest.approx((6 / 3 + 4 / 1 + 4 / 4) / 3)
    assert agg["bnpo"] == agg["dapo"] == pytest.approx(14 / 8)
    assert agg["dr_grpo"] == pytest.approx(14 / (3 * 8))
    assert agg["luspo"] == pytest.approx((6 + 4 + 4) / 3)
    assert AGGREGATIONS["dapo"](per_token, MASK, 8, torch.tensor(7.0)).item() == pytest.approx(14 / 7)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    d = torch.tensor([[0.5, -1.0]])  # log p - log q
    assert torch.allclose(kl_per_token(logp, ref, "k1"), d)
    assert torch.allclose(kl_per_token(logp, ref, "k2"), 0.5 * d**2)
    assert torch.allclose(kl_per_token(logp, ref, "k3"), torch.exp(-d) + d - 1)
    assert (kl_per_token(logp, ref, "k3") >= 0).all() and (kl_per_token(logp, ref, "k2") >= 0).all()


def test_reinforce_baseline_is_group_mean_then_batch_whitening_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])  # two groups of 2
    x = AdvantageInputs(rewards, torch.ones(4, 2), None, 0.0, None, 2)
    advantages, returns = ADVANTAGES["reinforce_baseline"].fn(x, defaults())
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0])
    assert returns is None
    assert torch.allclose(advantages, centred / (centred.std() + 1e-4))


def test_kl_in_the_reward_lowers_each_sequence_reward_by_beta_times_its_summed_kl():
    """Where the KL goes in the reward, a sequence-level estimator sees reward - beta * sum_t KL_t (TRL's RLOO)."""
    rewards, kl = torch.tensor([1.0, 0.0, 2.0, 2.0]), torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.5, 0.0], [0.0, 0.0]])
    x = AdvantageInputs(rewards, torch.ones(4, 2), kl, 0.5, None, 2)
    advantages, _ = ADVANTAGES["leave_one_out"].fn(x, defaults())
    penalised = rewards - 0.5 * kl.sum(-1)  # 0.85, 0.0, 1.75, 2.0
    assert torch.allclose(advantages, torch.tensor([0.85, -0.85, -0.25, 0.25]))
    group, _ = ADVANTAGES["group"].fn(x, defaults(scale_rewards="none"))
    assert torch.allclose(group, (penalised.view(2, 2) - penalised.view(2, 2).mean(1, keepdim=True)).view(-1))


def test_gae_estimator_puts_the_score_and_the_kl_where_ppo_does():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl, values = torch.tensor([[0.2, 0.4, 0.0]]), torch.zeros(1, 3)
    x = AdvantageInputs(torch.tensor([1.0]), mask, kl, 0.5, values, 1)
    advantages, returns = ADVANTAGES["gae"].fn(x, defaults(gamma=1.0, lam=1.0, whiten_advantages=False))
    # token rewards: -0.1, -0.2 + 1.0; values 0, so returns are the rewards-to-go
    assert torch.allclose(returns, torch.tensor([[0.7, 0.8, 0.0]]))
    assert torch.allclose(advantages, returns)


# ---------------------------------------------------------------- on-policy distillation


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_is_trls_distillation_loss_on_identical_hidden_states(beta):
    """TRL 1.16 DistillationTrainer's own loss function (`_chunked_divergence_loss`, its torch path on CPU) on
    the same hidden states and heads, at a temperature: same value and same gradient."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    torch.manual_seed(0)
    hidden, vocab = 8, 11
    h_student, h_teacher = torch.randn(2, 4, hidden, requires_grad=True), torch.randn(2, 4, hidden)
    w_student, w_teacher = torch.randn(vocab, hidden), torch.randn(vocab, hidden)
    mask, temperature = MASK[:2], 0.7
    theirs, _, _ = _chunked_divergence_loss(h_student, h_teacher, w_student, w_teacher, mask, beta,
                                            temperature=temperature)
    (their_grad,) = torch.autograd.grad(theirs, h_student)
    student_logits, teacher_logits = h_student @ w_student.T / temperature, h_teacher @ w_teacher.T / temperature
    x = LossInputs(torch.zeros(2, 4), torch.zeros(2, 4), None, mask, student_logits, lambda: teacher_logits)
    ours, _ = policy_objective(x, None, defaults(loss_type="jsd", beta=beta, advantage=None))
    (our_grad,) = torch.autograd.grad(ours, h_student)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert torch.allclose(our_grad, their_grad, rtol=1e-4, atol=1e-6)


def test_jsd_ends_are_the_two_kls_and_zero_for_equal_distributions():
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(1)
    student, teacher = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    mask = torch.ones(1, 3)
    for beta in (0.0, 0.3, 1.0):
        x = LossInputs(torch.zeros(1, 3), torch.zeros(1, 3), None, mask, student, lambda: teacher)
        ours, _ = policy_objective(x, None, defaults(loss_type="jsd", beta=beta, advantage=None))
        theirs = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, num_items_in_batch=mask.sum())
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    same = LossInputs(torch.zeros(1, 3), torch.zeros(1, 3), None, mask, student, lambda: student)
    assert policy_objective(same, None, defaults(loss_type="jsd", beta=0.5, advantage=None))[0].item() == \
        pytest.approx(0.0, abs=1e-6)


def test_every_registered_piece_has_a_test_here():
    assert set(ADVANTAGES) == TESTED["advantages"] and set(LOSSES) == TESTED["losses"]
    assert set(AGGREGATIONS) == TESTED["aggregations"] and set(IMPORTANCE_SAMPLING_LEVELS) == TESTED["levels"]
    assert set(KL_ESTIMATORS) == TESTED["kl"]
