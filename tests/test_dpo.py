"""method=dpo: the loss against hand computations, the reference (adapter-disabled or frozen copy),
precomputed reference log-probs, and preference accuracy rising when a tiny model overfits a few pairs."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import make_cfg, read_metrics, run_ddp, run_train, write_jsonl
from tunelab.data.preference import PreferenceDataModule
from tunelab.errors import TunelabError
from tunelab.methods.dpo import LN2, DPOEvaluator, DPOModule, dpo_loss, preference_accuracy

# Fixed summed log-probs of two pairs: policy chosen/rejected, reference chosen/rejected, token counts.
PC, PR, RC, RR = torch.tensor([-4.0, -9.0]), torch.tensor([-7.0, -6.5]), torch.tensor([-5.0, -8.0]), torch.tensor([-6.0, -7.0])
NC, NR = torch.tensor([4, 3]), torch.tensor([5, 2])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def deltas() -> list[float]:
    # d = (pc - rc) - (pr - rr): pair 0: (1) - (-1) = 2; pair 1: (-1) - (0.5) = -1.5
    return [((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(PC.tolist(), PR.tolist(), RC.tolist(), RR.tolist())]


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2)])
def test_sigmoid_loss_and_rewards_match_hand_computation(beta, eps):
    out = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d) for d in deltas()]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * 1.0, beta * -1.0])
    assert out.rejected_rewards.tolist() == pytest.approx([beta * -1.0, beta * 0.5])
    assert preference_accuracy(out.chosen_rewards, out.rejected_rewards).item() == 0.5  # one right, one wrong


def test_ipo_hinge_and_robust_match_hand_computation():
    beta, eps = 0.2, 0.1
    hinge = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge").losses
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - beta * d) for d in deltas()])
    ipo = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo", chosen_tokens=NC, rejected_tokens=NR).losses
    # per-token mean log-ratios: pair 0: 1/4 - (-1)/5; pair 1: -1/3 - 0.5/2
    assert ipo.tolist() == pytest.approx([(1 / 4 + 1 / 5 - 1 / (2 * beta)) ** 2, (-1 / 3 - 0.25 - 1 / (2 * beta)) ** 2])
    robust = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust", label_smoothing=eps).losses
    expected = [(-(1 - eps) * log_sigmoid(beta * d) + eps * log_sigmoid(-beta * d)) / (1 - 2 * eps) for d in deltas()]
    assert robust.tolist() == pytest.approx(expected, rel=1e-5)


def test_loss_is_ln2_when_policy_equals_reference():
    for eps in (0.0, 0.3):
        assert dpo_loss(PC, PR, PC, PR, beta=0.1, label_smoothing=eps).losses.tolist() == pytest.approx([LN2, LN2])


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "kto"}, "loss_type=kto is unknown"),
    ({"beta": 0.0}, "beta=0.0 must be > 0"),
    ({"label_smoothing": 0.5}, r"must be in \[0, 0.5\)"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "no effect with loss_type=ipo"),
    ({"reference_model": "/nonexistent/run"}, "holds no model"),
    ({"rpo_alpha": -1.0}, r"rpo_alpha=-1.0 must be >= 0"),
])
def test_bad_options_are_refused(tiny, options, message):
    model, _ = tiny
    with pytest.raises(TunelabError, match=message):
        DPOModule(model, optimizer=None, **options)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Capital of Peru?", "chosen": "  ", "rejected": "Quito."}, "record 0 has an empty chosen text"),
    ({"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": [{"role": "assistant", "content": ""}]},
     "record 0 has an empty rejected text"),
    ({"prompt": " ", "chosen": "Lima.", "rejected": "Quito."}, "record 0 has an empty prompt text"),
])
def test_pairs_with_empty_text_are_refused(record, message):
    from tunelab.data.preference import normalize_pairs

    with pytest.raises(TunelabError, match=message):
        normalize_pairs([record])


def test_a_missing_reference_run_is_one_clear_error(tmp_path):
    from tunelab.cli.common import user_error

    run = tmp_path / "run"
    with pytest.raises(Exception) as raised:
        run_train(run, "method=dpo", f"method.module.reference_model={tmp_path / 'no_such_run'}")
    error = str(user_error(raised.value))  # what the CLI prints after `error: `
    assert "no_such_run holds no model" in error and "\n" not in error
    assert not (run / "metrics.json").exists()


# ---------------------------------------------------------------- on a tiny model

PAIRS = [
    {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito, I think, or maybe Bogota."},
    {"prompt": "Symbol of iron?", "chosen": "Fe.", "rejected": "Ir, as in iron."},
    {"prompt": "Opposite of hot?", "chosen": "Cold.", "rejected": "Warm, probably."},
    {"prompt": "Three in words?", "chosen": "three", "rejected": "It is 3."},
]


@pytest.fixture()
def tiny():
    from tunelab.models import build_tiny_llama

    return build_tiny_llama()


@pytest.fixture()
def pairs_data(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    data = PreferenceDataModule(tokenizer, source=str(source), val_size=0, test_size=0, batch_size=4,
                                max_length=64, cache=False)
    data.setup("fit")
    return data


def policy(model, adapter: str):
    from peft import LoraConfig

    from tunelab.models.adapters import FullFineTuning, apply_adapter

    spec = FullFineTuning() if adapter == "full" else LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                                target_modules="all-linear")
    return apply_adapter(model, spec)


def optimizer(lr: float):
    from functools import partial

    return partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_step_zero_is_ln2_and_only_the_policy_gets_gradients(tiny, pairs_data, adapter):
    module = DPOModule(policy(tiny[0], adapter), optimizer(1e-3))
    assert (module.ref_model is None) == (adapter == "lora")  # LoRA: the adapter-disabled policy is the reference
    batch = next(iter(pairs_data.loader("train", train=False, shard=False)))
    loss, stats = module.step_stats(batch)
    assert loss.item() == pytest.approx(LN2, abs=1e-5)
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("model.") for n in grads)
    if adapter == "lora":
        assert all("lora_" in n for n in grads)
    else:
        assert all(p.grad is None and not p.requires_grad for p in module.ref_model.parameters())


@pytest.mark.parametrize("adapter, precompute", [
    pytest.param("full", True, marks=pytest.mark.slow),  # the default run covers full via the step-zero test
    ("lora", False),
])
def test_overfitting_four_pairs_raises_preference_accuracy(tiny, pairs_data, adapter, precompute):
    model = policy(tiny[0], adapter)
    evaluator = DPOEvaluator(split="train", batch_size=4, precision=None, beta=0.1)
    before = evaluator.run(model, pairs_data).metrics
    assert before["train/loss"] == pytest.approx(LN2, abs=1e-5) and before["train/accuracy"] == 0.5
    module = DPOModule(model, optimizer(1e-2 if adapter == "lora" else 3e-3), {"name": "constant"},
                       precompute_ref_logps=precompute)
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=pairs_data)
    if precompute:
        assert module.ref_model is None  # dropped once the reference had scored every pair
        assert "ref_chosen_logps" in pairs_data.datasets["train"].rows[0]
    result = evaluator.run(module.model, pairs_data)
    after, rows = result.metrics, result.rows
    assert after["train/accuracy"] == 1.0
    assert after["train/loss"] < 0.7 * LN2
    assert after["train/margin"] > 0 and after["train/reward_chosen"] > after["train/reward_rejected"]
    assert len(rows) == 4 and {"reward_chosen", "logps_rejected"} <= set(rows[0])


def test_rpo_adds_the_token_mean_nll_of_the_chosen_answers(tiny, pairs_data):
    import torch.nn.functional as F

    model = policy(tiny[0], "lora")
    batch = next(iter(pairs_data.loader("train", train=False, shard=False)))
    plain, _ = DPOModule(model, optimizer(1e-3)).step_stats(batch)
    rpo, stats = DPOModule(model, optimizer(1e-3), rpo_alpha=0.5).step_stats(batch)
    logits = model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["chosen_labels"][:, 1:].flatten(), ignore_index=-100)
    assert stats["nll_chosen"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * nll.item(), rel=1e-5)


def test_rpo_keeps_the_chosen_answers_likelier_than_plain_dpo_does(tiny, pairs_data):
    """Same start, same steps: the NLL term leaves the chosen answers with a higher log-prob than plain DPO,
    and the preference is still learned (reward accuracy against the frozen reference)."""
    batch = next(iter(pairs_data.loader("train", train=False, shard=False)))
    after = {}
    for rpo_alpha in (None, 1.0):
        torch.manual_seed(0)
        module = DPOModule(policy(copy.deepcopy(tiny[0]), "full"), optimizer(3e-3), {"name": "constant"},
                           rpo_alpha=rpo_alpha)
        trainer = pl.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, datamodule=pairs_data)
        with torch.no_grad():
            after[rpo_alpha] = {k: v.item() for k, v in module.step_stats(batch)[1].items()}
    assert after[1.0]["accuracy"] == 1.0
    assert after[1.0]["logps_chosen"] > after[None]["logps_chosen"] + 5.0


def test_dpo_run_end_to_end(tmp_path):
    run = tmp_path / "run"
    run_train(run, "method=dpo", "data.max_train_examples=16", "data.val_size=8", "data.test_size=8",
              "trainer.max_steps=3", "method.module.precompute_ref_logps=true")
    metrics = read_metrics(run)
    assert metrics["base"]["test/loss"] == pytest.approx(LN2, abs=1e-3)
    assert metrics["base"]["test/accuracy"] == 0.5
    assert {"test/loss", "test/accuracy", "test/margin", "test/logp_accuracy"} <= set(metrics["tuned"])
    assert (run / "final" / "adapter_config.json").is_file()


def test_dpo_starts_from_an_sft_run_dir_which_is_also_its_reference(tmp_path, one_thread):
    """model=run model.run_dir=SFT: the SFT LoRA is merged into the start point, a fresh LoRA trains on top,
    and the adapter-disabled reference is the SFT model, so the step-zero loss is ln 2 and the starting
    log-probs are the SFT model's, not the raw base model's."""
    sft = tmp_path / "sft"
    run_train(sft, "method=sft", "adapter=lora", "optimizer.lr=1e-2", "trainer.max_steps=6", "eval.metrics={}",
              "eval.compare_base=false")
    small = ["data.max_train_examples=16", "data.val_size=8", "data.test_size=8", "trainer.max_steps=3",
             "method.evaluator.precision=null"]
    from_sft = tmp_path / "dpo_sft"
    run_train(from_sft, "method=dpo", "model=run", f"model.run_dir={sft}", *small)
    start = read_metrics(from_sft)["base"]
    assert start["test/loss"] == pytest.approx(LN2, abs=1e-4) and start["test/accuracy"] == 0.5
    raw = raw_model_metrics(make_cfg(tmp_path / "raw", "method=dpo", *small))  # the same test pairs
    assert start["test/logps_chosen"] > raw["test/logps_chosen"] + 1.0  # SFT made the facts answers likelier
    assert (from_sft / "final" / "adapter_config.json").is_file()
    assert read_metrics(from_sft)["tuned"]["test/loss"] < LN2


def raw_model_metrics(cfg) -> dict:
    """DPO metrics of the untrained tiny model on the test split a run with this config uses."""
    from hydra.utils import instantiate

    model, tokenizer = instantiate(cfg.model)
    data = instantiate(cfg.data, tokenizer=tokenizer, tokenization=instantiate(cfg.method.tokenization))
    data.setup("fit")
    return DPOEvaluator(split="test", precision=None).run(policy(model, "lora"), data).metrics


def test_halves_of_a_batch_give_the_whole_batch_loss(tiny, pairs_data):
    """What DDP at the same global batch relies on: the mean DPO loss of two half batches (each padded to its
    own width) is the loss of the whole batch, so 2 ranks at batch B average to 1 process at 2B."""
    module = DPOModule(policy(tiny[0], "full"), optimizer(1e-3))
    with torch.no_grad():
        module.model.lm_head.weight.add_(0.01 * torch.randn_like(module.model.lm_head.weight))  # policy != reference
    rows = pairs_data.datasets["train"].rows
    whole, _ = module.step_stats(pairs_data.collator(rows))
    halves = [module.step_stats(pairs_data.collator(rows[i::2]))[0] for i in range(2)]
    assert whole.item() != pytest.approx(LN2, abs=1e-4)
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-5)


@pytest.mark.slow
def test_dpo_on_two_ddp_processes_matches_one_process_at_the_global_batch(tmp_path):
    same = ["method=dpo", "adapter=full", "trainer.precision=32-true", "optimizer.lr=1e-3", "scheduler.name=constant",
            "data.max_train_examples=16", "data.val_size=8", "data.test_size=8", "trainer.max_steps=-1",
            "trainer.max_epochs=1", "method.evaluator.precision=null"]
    ddp = run_ddp(tmp_path / "ddp", "data.batch_size=2", *same)
    run_train(tmp_path / "single", "data.batch_size=4", *same)
    single = read_metrics(tmp_path / "single")
    assert ddp["train"]["global_step"] == single["train"]["global_step"] == 4  # 16 pairs / global batch 4
    assert ddp["tuned"]["test/loss"] != pytest.approx(LN2, abs=1e-3)
    assert ddp["tuned"]["test/loss"] == pytest.approx(single["tuned"]["test/loss"], rel=1e-4)
    assert ddp["train"]["val/loss"] == pytest.approx(single["train"]["val/loss"], rel=1e-4)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_gradient_checkpointing_gives_dpo_the_same_loss_and_gradients(tiny, pairs_data, adapter):
    """runtime.gradient_checkpointing reaches every method through the assembler, DPO included."""
    import copy

    from tunelab.core.runtime import apply_runtime

    model = policy(tiny[0], adapter)
    plain = DPOModule(model, optimizer(1e-3))
    checkpointed = DPOModule(copy.deepcopy(model), optimizer(1e-3))
    apply_runtime(checkpointed, {"gradient_checkpointing": True})
    assert checkpointed.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    batch = next(iter(pairs_data.loader("train", train=False, shard=False)))
    grads = []
    for module in (plain, checkpointed):
        module.model.train()
        loss, _ = module.step_stats(batch)
        loss.backward()
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = loss.detach()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1
    for name, value in grads[0].items():
        torch.testing.assert_close(grads[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
