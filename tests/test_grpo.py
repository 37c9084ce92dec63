"""method=grpo and method=rloo: the maths by hand and against TRL's formulas, then a tiny policy, then runs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import pytorch_lightning as pl
import torch

from omegaconf import OmegaConf

from tests.helpers import make_cfg, read_metrics, run_train
from tunelab.errors import TunelabError
from tunelab.core.tensors import to_left_padding
from tunelab.methods.rl.advantages import group_advantages, rloo_advantages
from tunelab.methods.rl.kl import k3_kl
from tunelab.methods.rl.losses import LOSSES, LossInputs, aggregate, clipped_token_loss, policy_objective
from tunelab.methods.rl.options import defaults
from tunelab.run.assemble import build_datamodule, build_module, load_model
from tunelab.methods.rewards import (FormatReward, LengthPenalty, NumericAnswerReward, WeightedRewards, build_rewards,
                                     final_number)

# ------------------------------------------------------------------ advantages


def test_group_advantages_by_hand_with_an_all_equal_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4; the second all equal
    advantages, std = group_advantages(rewards, 4, "group")
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4)
    assert torch.allclose(advantages[:4], expected)
    assert torch.equal(advantages[4:], torch.zeros(4))  # no learning signal, and no division by zero
    assert std[4:].tolist() == [0.0] * 4
    batch, _ = group_advantages(rewards, 4, "batch")
    assert torch.allclose(batch[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (rewards.std() + 1e-4))
    none, _ = group_advantages(rewards, 4, "none")
    assert none.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_rloo_baseline_is_the_mean_of_the_others_by_hand():
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 3.0])
    # group 1: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5; group 2 all equal: 0
    assert rloo_advantages(rewards, 3).tolist() == [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]
    whitened = rloo_advantages(rewards, 3, normalize=True)
    assert whitened.mean().abs() < 1e-6


# ------------------------------------------------------------------ the loss


MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # lengths 3 and 1


def test_each_loss_type_normaliser_on_a_hand_made_mask():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])  # 100: padding, never counted
    assert aggregate(per_token, MASK, "grpo", 8).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate(per_token, MASK, "bnpo", 8).item() == pytest.approx(10 / 4)
    assert aggregate(per_token, MASK, "dr_grpo", 8).item() == pytest.approx(10 / (2 * 8))
    assert aggregate(per_token, MASK, "dapo", 8).item() == pytest.approx(10 / 4)
    assert aggregate(per_token, MASK, "dapo", 8, token_normaliser=torch.tensor(5.0)).item() == pytest.approx(10 / 5)
    with pytest.raises(TunelabError, match="loss_type"):
        aggregate(per_token, MASK, "ppo", 8)


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, beta, eps_low, eps_high,
                  loss_type, max_completion_length, num_items_in_batch):
    """Transcribed from TRL 1.16 `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py, token-level
    importance sampling, one process, no accumulation)."""
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    return (per_token_loss * mask).sum() / num_items_in_batch.clamp(min=1.0)  # dapo


def loss_of(loss_type: str, beta: float, eps_high: float):
    """The module's minibatch loss (one process: dapo's normaliser is the minibatch's token count)."""
    options = defaults(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=eps_high, max_completion_length=4)
    return lambda logps, old, ref, advantages, mask: policy_objective(LossInputs(logps, old, advantages, mask), ref,
                                                                      options)


def test_batch_tokens_counts_every_attention_mask():
    from tunelab.run.summary import batch_tokens

    chosen = torch.tensor([[1, 1, 0], [1, 0, 0]])
    batch = {"chosen_attention_mask": chosen, "input_ids": torch.ones(2, 3), "attention_mask": chosen,
             "rejected_attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "labels": torch.ones(2, 3)}
    assert batch_tokens(batch) == {"tokens_processed": 8}  # the plain mask repeats the chosen one
    assert batch_tokens({"attention_mask": chosen, "input_ids": torch.ones(2, 3)}) == {"tokens_processed": 3}


@pytest.mark.parametrize("method,data", [("sft", "arithmetic_sft"), ("dpo", "arithmetic")])
def test_eval_verifiable_scores_any_method_as_grpo_is_scored(tmp_path, method, data):
    run_dir = tmp_path / "run"
    run_train(run_dir, f"method={method}", f"data={data}", "eval=verifiable", "trainer.max_steps=2",
              "data.batch_size=2", "eval.max_examples=4", "eval.generation.max_new_tokens=4")
    metrics = read_metrics(run_dir)
    assert {"test/correct", "test/format", "test/reward"} <= set(metrics["tuned"]) <= set(metrics["base"])
    assert "test/accuracy" not in metrics["tuned"] and "test/rougeL" not in metrics["tuned"]  # no own/default eval
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").open()]
    assert len(predictions) == 4 and all({"base", "tuned"} <= set(p) for p in predictions)  # 4 test prompts
    rows = 2 * 2 * (2 if method == "dpo" else 1)  # steps x batch x (chosen and rejected)
    assert 0 < metrics["train"]["tokens_processed"] <= rows * 96  # data.max_length of debug=fast


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_the_loss_is_trls_grpo_loss_on_identical_inputs(loss_type, beta, eps_high):
    torch.manual_seed(0)
    logps = -torch.rand(2, 4) * 3
    old = logps + 0.3 * torch.randn(2, 4)  # ratios inside and outside the clip range
    ref = logps + 0.5 * torch.randn(2, 4)
    advantages = torch.tensor([1.3, -0.7])
    ours, _ = loss_of(loss_type, beta, eps_high)(logps, old, ref, advantages, MASK)
    theirs = trl_grpo_loss(logps, old, ref, advantages, MASK, beta, 0.2, eps_high, loss_type, 4, MASK.sum())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_clip_higher_clips_only_above():
    logps, old = torch.log(torch.tensor([[1.25, 0.7]])), torch.zeros(1, 2)
    per_token, ratio = clipped_token_loss(logps, old, torch.tensor([1.0]), 0.2, 0.28)
    assert per_token.tolist()[0] == pytest.approx([-1.25, -0.7])  # 1.25 < 1.28: not clipped
    per_token, _ = clipped_token_loss(logps, old, torch.tensor([1.0]), 0.2, 0.2)
    assert per_token.tolist()[0] == pytest.approx([-1.2, -0.7])


def test_k3_kl_is_zero_for_equal_policies_and_positive_otherwise():
    a = torch.tensor([[-1.0, -2.0]])
    assert torch.equal(k3_kl(a, a), torch.zeros(1, 2))
    assert (k3_kl(a, a - 0.5) > 0).all()


# ------------------------------------------------------------------ rewards


def test_the_rewards_library():
    assert final_number("so 3 + 4 = 7.") == 7.0 and final_number(r"\boxed{12} and 5") == 12.0
    assert final_number("no digits") is None and final_number("-1,250.5") == -1250.5
    numeric = NumericAnswerReward()(None, ["The answer is 71.", "71", "about 70", "no"], ["The answer is 71."] * 3 + [None])
    assert numeric == [1.0, 1.0, 0.0, 0.0]
    assert FormatReward(r"The answer is \d+\.")(None, ["The answer is 5.", "5"]) == [1.0, 0.0]
    assert LengthPenalty(max_words=2, per_word=0.5)(None, ["a b", "a b c d"]) == [0.0, -1.0]
    weighted = WeightedRewards({"correct": {"_target_": "tunelab.methods.rewards.NumericAnswerReward"},
                                "short": {"_target_": "tunelab.methods.rewards.LengthPenalty", "max_words": 1}},
                               [1.0, 0.5])
    assert weighted(["q"], ["it is 3"], ["3"]).tolist() == pytest.approx([1.0 - 0.5 * 0.05 * 2])


def test_a_reward_that_does_not_resolve_or_has_the_wrong_weights_is_one_line():
    with pytest.raises(TunelabError, match="'nope.Missing' does not resolve"):
        build_rewards({"correct": {"_target_": "nope.Missing"}})
    with pytest.raises(TunelabError, match="reward_weights has 1 values for 2 rewards"):
        WeightedRewards({"a": {"_target_": "tunelab.methods.rewards.ExactMatchReward"},
                         "b": {"_target_": "tunelab.methods.rewards.ExactMatchReward"}}, [1.0])
    assert build_rewards({"f": {"_target_": "tests.test_grpo.digit_reward"}})["f"] is digit_reward  # a plain function


def digit_reward(prompts, responses, references):
    """A programmatic reward that varies between a tiny model's random responses: the share of digits."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def vowel_reward(prompts, responses, references):
    return [sum(c in "aeiou" for c in r.lower()) / max(len(r), 1) for r in responses]


# ------------------------------------------------------------------ a tiny policy

GRPO_FAST = ["trainer.precision=32-true", "data.max_train_examples=8", "data.batch_size=2",
             "method.module.num_generations=4", "method.module.max_completion_length=6",
             "method.module.rewards.format=null", "method.module.reward_weights=null",
             "+method.module.rewards.vowels._target_=tests.test_grpo.vowel_reward",
             "method.evaluator.max_examples=4", "trainer.max_steps=-1", "trainer.max_epochs=1"]


def build(tmp_path, adapter: str, *overrides: str, method: str = "grpo"):
    cfg = make_cfg(tmp_path, f"method={method}", *GRPO_FAST, f"adapter={adapter}", "optimizer.lr=1e-2", *overrides)
    pl.seed_everything(0)
    model, tokenizer = load_model(cfg)  # the assembler's own steps, so the tests build what training builds
    dm = build_datamodule(cfg, tokenizer)
    module = build_module(cfg, model, tokenizer)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    return module, dm, trainer


def connect(module, dm, trainer):
    dm.setup("fit")
    module.trainer = trainer
    trainer.strategy.connect(module)
    trainer.datamodule = dm  # what fit() would set
    return dm.collator([dm.datasets["train"][i] for i in range(2)])


@pytest.mark.parametrize("iterations", [1, 2])
def test_updates_move_the_policy_with_the_first_ratio_exactly_1(tmp_path, iterations):
    module, dm, trainer = build(tmp_path, "lora", f"method.module.num_iterations={iterations}",
                                "method.module.loss_type=grpo")
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    for key in ("grpo/reward", "grpo/reward_std", "grpo/frac_reward_zero_std", "grpo/rewards/vowels/mean",
                "grpo/rewards/vowels/std", "grpo/rewards/correct/mean", "grpo/entropy", "grpo/clip_ratio/region_mean",
                "time/generate", "time/score", "time/train", "time/generate_share"):
        assert key in logged and math.isfinite(float(logged[key])), key
    assert float(logged["grpo/first_ratio_max_deviation"]) == 0.0  # old log-probs are the same forward's
    assert trainer.global_step == 4 * iterations  # 4 generation batches of 2 prompts x iterations
    assert any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters() if n in before)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * module.log_samples and {"group", "advantage", "vowels", "correct"} <= set(rows[0])


def test_kl_is_exactly_zero_with_a_fresh_adapter_and_logprobs_match_generation(tmp_path):
    module, dm, trainer = build(tmp_path, "lora", "method.module.beta=0.04")
    assert module.use_reference and module.ref_model is None  # the adapter-disabled policy is the reference
    batch = connect(module, dm, trainer)
    query, query_mask = to_left_padding(batch["input_ids"], batch["attention_mask"], dm.tokenizer.pad_token_id)
    response, mask, _, from_generation = module.generate(query, query_mask)  # the engine's log-probs
    with torch.no_grad():
        logprobs = module.policy_forward(query, query_mask, response, mask, with_values=False).logprobs
    ref = module.reference_logprobs(query, query_mask, response, mask)
    assert torch.equal(logprobs, ref)
    assert torch.equal(k3_kl(logprobs, ref), torch.zeros_like(ref))
    assert torch.allclose(from_generation[mask.bool()], logprobs[mask.bool()], atol=1e-4)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_beta_0_builds_no_reference_and_beta_above_0_does_for_full(tmp_path, adapter):
    module, _, _ = build(tmp_path, adapter, "method.module.beta=0.0")
    assert not module.use_reference and module.ref_model is None
    if adapter == "full":
        with_kl, _, _ = build(tmp_path, adapter, "method.module.beta=0.1")
        assert with_kl.ref_model is not None and not any(p.requires_grad for p in with_kl.ref_model.parameters())


def test_rloo_rollout_penalises_kl_in_the_reward_and_trains(tmp_path):
    module, dm, trainer = build(tmp_path, "lora", method="rloo")
    assert module.o.advantage == "leave_one_out" and module.o.num_generations == 4 and module.o.beta == 0.05
    trainer.fit(module, datamodule=dm)
    assert float(trainer.callback_metrics["rloo/first_ratio_max_deviation"]) < 1e-5
    assert "rloo/kl" in trainer.callback_metrics


def test_mask_truncated_completions_drops_cut_completions_from_the_loss(tmp_path):
    module, dm, trainer = build(tmp_path, "lora", "method.module.mask_truncated_completions=true")
    batch = connect(module, dm, trainer)
    g = module.rollout(batch)
    assert torch.equal(g.loss_mask.sum(-1) > 0, g.has_eos)  # at 6 new tokens most are cut


# ------------------------------------------------------------------ bad input


BAD_INPUT = [
    ("method.module.num_generations=1", "num_generations=1; group-relative advantages need at least 2"),
    ("method.module.num_minibatches=3", "does not divide into method.module.num_minibatches=3 whole groups"),
    ("method.module.rewards.correct._target_=tunelab.methods.rewards.Nope", "'tunelab.methods.rewards.Nope' does not resolve"),
    ("data.filter={prompt:'no such question'}", "keeps no training record of 1200"),
    ("data.max_length=4", "no train pair fits data.max_length=4"),  # every prompt dropped as too long
]


@pytest.mark.parametrize("override, message", BAD_INPUT)
def test_bad_input_is_one_clear_error(tmp_path, override, message):
    from tunelab.cli.common import user_error

    with pytest.raises(Exception) as raised:
        run_train(tmp_path / "bad", "method=grpo", *GRPO_FAST, "adapter=lora", override, "method.evaluator.compare_base=false")
    error = user_error(raised.value)
    assert error is not None and message in str(error), raised.value
    assert not (tmp_path / "bad" / "metrics.json").exists()


@pytest.mark.parametrize("override, message", [BAD_INPUT[0], BAD_INPUT[2]])
def test_bad_input_on_the_command_line_is_one_line_and_exit_2(tmp_path, override, message):
    from tests.test_cli import assert_one_line_error, tunelab_train

    result, run_dir = tunelab_train(tmp_path, "method=grpo", override)
    assert_one_line_error(result, message)
    assert not (run_dir / "metrics.json").exists()


# ------------------------------------------------------------------ runs


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_run_writes_metrics_and_a_loadable_policy(tmp_path, method):
    run_dir = tmp_path / "run"
    run_train(run_dir, f"method={method}", *GRPO_FAST, "adapter=lora")
    metrics = read_metrics(run_dir)
    assert {"test/reward", "test/correct", "test/vowels", "test/response_words"} <= set(metrics["tuned"])
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert any(r.get(f"{method}/reward") for r in rows) and any(r.get("time/generate") for r in rows)
    recorded = OmegaConf.load(run_dir / "resolved_config.yaml")
    assert recorded.trainer.gradient_clip_val is None
    # the cost side of a comparison: 4 updates x 2 prompts x 4 completions of at most 6 sampled tokens, each
    # trained on once with its prompt
    generated, processed = metrics["train"]["generated_tokens"], metrics["train"]["tokens_processed"]
    assert 0 < generated <= 4 * 2 * 4 * 6 and processed > generated
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None


@pytest.mark.parametrize("loss_type", [name for name in LOSSES if name != "jsd"])
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_every_loss_type_composes_with_both_adapters(tmp_path, loss_type, adapter):
    module, _, _ = build(tmp_path, adapter, f"method.module.loss_type={loss_type}")
    assert module.o.loss_type == loss_type and module.loss_kind is LOSSES[loss_type]


def test_the_shipped_task_splits_the_same_for_sft_and_rl(tmp_path):
    rl = make_cfg(tmp_path, "method=grpo", fast=False)
    sft = make_cfg(tmp_path, "data=arithmetic_sft", fast=False)
    assert rl.data.source == sft.data.source == "tunelab:arithmetic.jsonl" and rl.data.split_seed == sft.data.split_seed
    from tunelab.data.sources import load_splits, split_records

    splits = split_records(load_splits(rl.data.source), rl.data.val_size, rl.data.test_size, rl.data.split_seed)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (960, 120, 120)


# ------------------------------------------------------------------ resume and DDP


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_resume_mid_training_equals_uninterrupted_sampling_rng_included(tmp_path, method):
    """tunelab-verify's resume pair: N steps, checkpoint, fresh objects resume for N more, against 2N in one go.
    Without the sampling RNG in the checkpoint the resumed half samples other completions (other losses)."""
    from omegaconf import OmegaConf as Conf

    from tunelab.paths import CONF_DIR
    from tunelab.verify.pairs import PASS, Context, resume

    settings = Conf.merge(Conf.load(CONF_DIR / "verify.yaml"),
                          {"tiny": True, "steps": 2, "batch_size": 2, "accumulate": 1, "max_train_examples": 6})
    # A KL term: at ratio 1 a group-normalised advantage alone gives loss 0 whatever is sampled.
    result = resume(Context([f"method={method}", "method.module.num_generations=2",
                             "method.module.beta=0.04", "method.module.max_completion_length=4",
                             "method.evaluator.max_examples=2", "method.module.reward_weights=null",
                             "method.module.rewards.format=null",
                             "method.module.rewards.correct._target_=tests.test_grpo.vowel_reward"], settings, tmp_path))
    assert result.status == PASS, result


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_two_ddp_processes_each_sample_whole_groups(tmp_path, method):
    from tests.helpers import run_ddp

    metrics = run_ddp(tmp_path / "ddp", f"method={method}", *GRPO_FAST, "adapter=lora")
    assert "test/vowels" in metrics["tuned"]  # the reward lives in tests/
