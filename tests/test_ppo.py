"""method=ppo: the maths by hand, then a few real updates of a tiny policy with both adapters."""

from __future__ import annotations

import csv
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import make_cfg, read_metrics, run_ddp, run_train
from tunelab.errors import TunelabError
from tunelab.core.tensors import masked_whiten, response_mask, to_left_padding
from tunelab.methods.rl.advantages import gae
from tunelab.methods.rl.critic import value_loss
from tunelab.methods.rl.kl import AdaptiveKL, kl_per_token, token_rewards
from tunelab.methods.rl.losses import LossInputs, policy_objective
from tunelab.methods.rl.options import defaults
from tunelab.methods.rewards import check_scores
from tunelab.models.adapters import apply_adapter, build_adapter

# ------------------------------------------------------------------ maths


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is past the response: ignored
    gamma, lam = 0.9, 0.5
    # deltas: t2 = 2 + 0 - 1.5 = 0.5; t1 = 0 + 0.9*1.5 - 1 = 0.35; t0 = 1 + 0.9*1 - 0.5 = 1.4
    a2 = 0.5
    a1 = 0.35 + gamma * lam * a2
    a0 = 1.4 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0]]))


def test_masked_whitening_has_mean_0_and_std_1_over_the_mask():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    mask = (torch.rand(4, 7) > 0.3).float()
    w = masked_whiten(x, mask)
    picked = w[mask.bool()]
    assert picked.mean().abs().item() < 1e-5
    assert picked.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(w[~mask.bool()], x[~mask.bool()])  # padding is not touched


def test_kl_penalty_and_score_land_where_they_should():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -0.1]])
    ref = torch.tensor([[-1.5, -2.0, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    kl = kl_per_token(logprobs, ref) * mask
    rewards = token_rewards(torch.tensor([2.0]), kl, mask, beta=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, -0.05 + 2.0, 0.0]]))
    same = torch.tensor([[-1.0, -2.0]])
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_per_token(same, same, estimator), torch.zeros(1, 2))


def test_response_mask_ends_at_the_first_eos_of_the_response_only():
    eos = 2
    responses = torch.tensor([[5, 6, eos, eos, eos], [5, 6, 7, 8, 9], [eos, 6, 7, 8, 9]])
    mask, has_eos = response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
    # prompts left-padded with pad == EOS: padding moves, nothing else changes
    ids, attn = to_left_padding(torch.tensor([[7, eos, 8, eos], [9, 0, 0, 0]]), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]), eos)
    assert ids.tolist() == [[eos, 7, eos, 8], [eos, eos, eos, 9]] and attn.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_clipped_policy_and_value_losses():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.9]]))
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    # PPO's loss: the clipped surrogate averaged over the minibatch's tokens (loss_type=bnpo)
    loss, stats = policy_objective(LossInputs(new, old, adv, mask), None, defaults(loss_type="bnpo", epsilon=0.2))
    # token 0: ratio 1.5 is clipped to 1.2 (positive advantage); token 1: 0.9 inside the range
    assert loss.item() == pytest.approx(-(1.2 + 0.9) / 2)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(0.5)
    v_loss, v_clip = value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.5)
    assert v_loss.item() == pytest.approx(0.5 * (0.5 - 3.0) ** 2) and v_clip.item() == 1.0


def test_adaptive_kl_moves_beta_towards_the_target():
    fixed = AdaptiveKL(0.1)
    fixed.update(100.0, 16)
    assert fixed.value == 0.1
    adaptive = AdaptiveKL(0.1, target=6.0, horizon=100)
    adaptive.update(12.0, 10)  # KL too high: beta grows by at most 20% * n/horizon
    assert adaptive.value == pytest.approx(0.1 * 1.02)


@pytest.mark.parametrize("scores, message", [([1.0], "shape"), ([1.0, float("nan")], "NaN"), ("ab", "not numbers")])
def test_a_wrong_reward_is_refused(scores, message):
    with pytest.raises(TunelabError, match=message):
        check_scores(scores, 2, "test")


# ------------------------------------------------------------------ a tiny policy


def vowel_reward(prompts, responses, references):
    """A programmatic reward: the share of vowels (any callable works); it varies between responses."""
    return [sum(c in "aeiou" for c in r.lower()) / max(len(r), 1) for r in responses]


PPO_FAST = ["method=ppo", "trainer.precision=32-true", "data.max_train_examples=8", "data.batch_size=4",
            "method.module.max_completion_length=6", "method.module.num_iterations=2", "method.module.num_minibatches=2",
            "method.module.rewards.score._target_=tests.test_ppo.vowel_reward",
            "method.evaluator.max_examples=4", "trainer.max_steps=-1", "trainer.max_epochs=1"]


def build(tmp_path, adapter: str, *overrides: str):
    cfg = make_cfg(tmp_path, *PPO_FAST, f"adapter={adapter}", "optimizer.lr=1e-2", *overrides)
    pl.seed_everything(0)
    model, tokenizer = instantiate(cfg.model, _convert_="all")
    dm = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all",
                     tokenization=instantiate(cfg.method.tokenization, _convert_="all"))
    model = apply_adapter(model, build_adapter(cfg.adapter)[0])
    module = instantiate(cfg.method.module, model=model, optimizer=instantiate(cfg.optimizer),
                         scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    return module, dm, trainer


@pytest.mark.parametrize("adapter", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_a_few_updates_change_policy_and_value_with_exact_first_ratio(tmp_path, adapter):
    module, dm, trainer = build(tmp_path, adapter)
    policy_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    value_before = {n: p.detach().clone() for n, p in module.critic.named_parameters()}
    assert (module.ref_model is None) == (adapter == "lora")  # a fresh adapter is its own reference
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    for key in ("reward", "kl", "entropy", "clip_ratio/region_mean", "approxkl", "value_loss", "explained_variance",
                "completion_length", "first_ratio_max_deviation", "sampling/sampling_logp_difference/mean"):
        assert f"ppo/{key}" in logged and math.isfinite(float(logged[f"ppo/{key}"]))
    assert float(logged["ppo/first_ratio_max_deviation"]) < 1e-5  # the ratio is 1 before the first step
    assert trainer.global_step == 2 * 2 * 2  # 2 rollouts x 2 epochs x 2 minibatches
    assert any(not torch.equal(p, policy_before[n]) for n, p in module.model.named_parameters() if n in policy_before)
    assert any(not torch.equal(p, value_before[n]) for n, p in module.critic.named_parameters())
    assert (tmp_path / "samples.jsonl").read_text().count("\n") == 2 * module.log_samples


def test_fresh_adapter_kl_is_exactly_zero_and_generation_logprobs_match(tmp_path):
    module, dm, trainer = build(tmp_path, "lora")
    dm.setup("fit")
    module.trainer = trainer
    trainer.strategy.connect(module)
    trainer.datamodule = dm  # what fit() would set
    batch = dm.collator([dm.datasets["train"][i] for i in range(4)])
    query, query_mask = to_left_padding(batch["input_ids"], batch["attention_mask"], dm.tokenizer.pad_token_id)
    response, mask, _, from_generation = module.generate(query, query_mask)  # the engine's log-probs
    with torch.no_grad():
        logprobs = module.policy_forward(query, query_mask, response, mask, with_values=False).logprobs
        ref = module.reference_logprobs(query, query_mask, response, mask)
    m = mask.bool()
    assert torch.allclose(from_generation[m], logprobs[m], atol=1e-4)
    assert torch.equal(logprobs, ref)  # LoRA's B starts at 0: the policy is exactly the reference


def test_value_model_can_start_from_a_reward_model(tmp_path):
    from tunelab.methods.reward_model import as_reward_model
    from tunelab.models import build_tiny_llama

    model, tok = build_tiny_llama()
    folder = tmp_path / "rm" / "final"
    rm = as_reward_model(model, tok)
    rm.config.architectures = ["LlamaForSequenceClassification"]
    rm.save_pretrained(folder)
    tok.save_pretrained(folder)
    module, dm, _ = build(tmp_path, "lora", f"method.module.critic={tmp_path / 'rm'}")
    assert not isinstance(module.critic, torch.nn.Linear)
    assert all(p.requires_grad for p in module.critic.parameters())
    query, response = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    ones = torch.ones_like
    values = module.policy_forward(query, ones(query), response, ones(response), with_values=True).values
    assert values.shape == (1, 2) and torch.isfinite(values).all()


def test_ppo_run_end_to_end_writes_metrics_and_a_loadable_policy(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, *PPO_FAST, "adapter=lora")
    metrics = read_metrics(run_dir)
    assert {"test/reward", "test/response_words"} <= set(metrics["tuned"])
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert any(r.get("ppo/kl") for r in rows)
    # The method's Trainer pins are what the run records: PPO optimises manually, so no automatic clipping.
    from omegaconf import OmegaConf

    recorded = OmegaConf.load(run_dir / "resolved_config.yaml")
    assert recorded.trainer.gradient_clip_val is None
    assert json.loads((run_dir / "provenance.json").read_text())["config"]["trainer"]["gradient_clip_val"] is None
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None


def test_a_reward_callable_with_the_wrong_shape_stops_the_run(tmp_path):
    with pytest.raises(TunelabError, match="shape"):
        run_train(tmp_path / "bad", *PPO_FAST, "adapter=lora", "method.module.rewards.score._target_=tests.test_ppo.bad_reward",
                  "method.evaluator.compare_base=false")


def bad_reward(prompts, responses, references):
    return [0.0]


def test_pipeline_stages_compose_and_point_at_the_previous_run_dirs(tmp_path):
    sft = make_cfg(tmp_path, "experiment=rlhf_sft", fast=False)
    reward = make_cfg(tmp_path, "experiment=rlhf_reward", fast=False)
    ppo = make_cfg(tmp_path, "experiment=rlhf_ppo", "rlhf.sft_run=/runs/sft", "rlhf.reward_run=/runs/rm", fast=False)
    assert (sft.method.name, reward.method.name, ppo.method.name) == ("sft", "reward", "ppo")
    assert ppo.model.run_dir == "/runs/sft"
    assert ppo.method.module.rewards.score.run_dir == "/runs/rm"
    assert ppo.method.evaluator.rewards.score.run_dir == "/runs/rm"
    assert ppo.trainer.gradient_clip_val == ppo.method.module.max_grad_norm  # clipping moves into the module
    rouge = make_cfg(tmp_path, "experiment=rlhf_ppo_rouge", fast=False)
    assert rouge.method.module.rewards.score._target_.endswith("RougeReward")


def test_a_reward_run_dir_that_is_not_a_reward_model_is_refused(tmp_path):
    from tunelab.methods.rewards import RewardModelScorer

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(TunelabError, match="not a reward model"):
        RewardModelScorer(str(tmp_path))


@pytest.mark.slow
def test_ppo_runs_on_two_ddp_processes(tmp_path):
    assert "test/reward" in run_ddp(tmp_path / "ddp", *PPO_FAST, "adapter=lora")["tuned"]  # the reward lives in tests/


def test_a_resumed_run_continues_the_adaptive_kl_coefficient(tmp_path):
    module, dm, trainer = build(tmp_path, "lora", "method.module.kl_target=0.001", "method.module.kl_horizon=10")
    trainer.fit(module, datamodule=dm)
    adapted = module.kl.value
    assert adapted != pytest.approx(0.05)  # the controller moved beta away from kl_coef
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    resumed, dm2, _ = build(tmp_path, "lora", "method.module.kl_target=0.001", "method.module.kl_horizon=10")
    done = pl.Trainer(accelerator="cpu", max_steps=trainer.global_step, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    done.fit(resumed, datamodule=dm2, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.kl.value == adapted
