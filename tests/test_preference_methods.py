"""method=kto|orpo|simpo|cpo: each loss by hand and against TRL's formula on identical log-probs, KTO's KL
term on a hand-made batch, no reference model for the reference-free losses, bad input in one line, and
end-to-end runs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import read_metrics, run_train, write_jsonl
from tests.test_dpo import PAIRS, optimizer, policy
from tunelab.data.preference import PreferenceDataModule, UnpairedTokenizer
from tunelab.data.tokenize import IGNORE
from tunelab.errors import TunelabError
from tunelab.methods.cpo import CPOModule, cpo_loss
from tunelab.methods.kto import KTOModule, kl_estimate, kto_loss, mismatched_batch
from tunelab.methods.orpo import ORPOModule, log1mexp, orpo_loss

# Per-token mean log-probs of three pairs (ORPO / SimPO read means), and summed ones (CPO sigmoid).
MC, MR = torch.tensor([-0.5, -1.2, -2.0]), torch.tensor([-0.9, -0.7, -2.5])
SC, SR = torch.tensor([-4.0, -9.0, -3.0]), torch.tensor([-7.0, -6.5, -3.5])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.fixture()
def tiny():
    from tunelab.models import build_tiny_llama

    return build_tiny_llama()


@pytest.fixture()
def pairs_data(tmp_path, tokenizer):
    data = PreferenceDataModule(tokenizer, source=str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)), val_size=0,
                                test_size=0, batch_size=4, max_length=64, cache=False)
    data.setup("fit")
    return data


def trl_self(**options):
    """The attributes TRL's loss methods read from their trainer."""
    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), **options)


# ---------------------------------------------------------------- ORPO


def test_orpo_term_matches_hand_computation():
    beta = 0.1
    out = orpo_loss(MC, MR, beta)
    for loss, c, r in zip(out.losses.tolist(), MC.tolist(), MR.tolist()):
        log_odds = (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
        assert loss == pytest.approx(-beta * log_sigmoid(log_odds), rel=1e-5)
    assert log1mexp(torch.tensor([-1e-6, -50.0])).tolist() == pytest.approx([math.log(1e-6), -math.exp(-50)], rel=1e-4)


def test_orpo_term_matches_trls_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.25
    trl_losses, chosen, rejected, _, log_odds = ORPOTrainer.odds_ratio_loss(trl_self(beta=beta), MC, MR)
    ours = orpo_loss(MC, MR, beta)
    # TRL returns beta * log sigmoid (and subtracts its mean); ours is the positive term (added).
    assert ours.losses.tolist() == pytest.approx((-trl_losses).tolist(), rel=1e-6)
    assert ours.log_odds.mean().item() == pytest.approx(log_odds.item(), rel=1e-6)
    assert ours.chosen_rewards.tolist() == pytest.approx(chosen.tolist())


# ---------------------------------------------------------------- CPO / SimPO


@pytest.mark.parametrize("loss_type, chosen, rejected", [("sigmoid", SC, SR), ("simpo", MC, MR),
                                                          ("hinge", SC, SR), ("ipo", MC, MR)])
def test_cpo_family_matches_trls_cpo_loss(loss_type, chosen, rejected):
    from trl.experimental.cpo import CPOTrainer

    options = {"beta": 2.0, "loss_type": loss_type, "simpo_gamma": 0.8,
               "label_smoothing": 0.1 if loss_type == "sigmoid" else 0.0}
    trl_losses, trl_chosen, _ = CPOTrainer.cpo_loss(trl_self(alpha=0.0, **options), chosen, rejected)
    ours = cpo_loss(chosen, rejected, **options)
    assert ours.losses.tolist() == pytest.approx(trl_losses.tolist(), rel=1e-6)
    assert ours.chosen_rewards.tolist() == pytest.approx(trl_chosen.tolist())


def test_simpo_and_cpo_match_hand_computation():
    beta, gamma = 2.0, 0.8
    simpo = cpo_loss(MC, MR, beta, "simpo", gamma).losses
    assert simpo.tolist() == pytest.approx([-log_sigmoid(beta * (c - r) - gamma) for c, r in zip(MC.tolist(), MR.tolist())], rel=1e-5)
    cpo = cpo_loss(SC, SR, 0.1, "sigmoid").losses
    assert cpo.tolist() == pytest.approx([-log_sigmoid(0.1 * (c - r)) for c, r in zip(SC.tolist(), SR.tolist())], rel=1e-5)


# ---------------------------------------------------------------- KTO


def test_kto_loss_matches_hand_computation_and_trls_formula():
    beta, kl, wd, wu = 0.5, torch.tensor(0.3), 1.0, 1.33
    logps, ref = torch.tensor([-4.0, -9.0, -3.0, -6.0]), torch.tensor([-5.0, -8.0, -3.5, -5.0])
    desirable = torch.tensor([True, False, True, False])
    out = kto_loss(logps, ref, desirable, kl, beta, wd, wu)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # r = logps - ref = [1, -1, 0.5, -1]
    expected = [wd * (1 - sig(beta * (1 - 0.3))), wu * (1 - sig(beta * (0.3 + 1))),
                wd * (1 - sig(beta * (0.5 - 0.3))), wu * (1 - sig(beta * (0.3 + 1)))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    # TRL's KTOTrainer._compute_loss (trl 1.16, trainer/kto_trainer.py), transcribed: chosen then rejected losses
    # concatenated, each weighted, then nanmean; our per-example losses have the same mean.
    ratio = logps - ref
    trl_chosen = 1 - torch.sigmoid(beta * (ratio[desirable] - kl))
    trl_rejected = 1 - torch.sigmoid(beta * (kl - ratio[~desirable]))
    trl = torch.cat((wd * trl_chosen, wu * trl_rejected)).nanmean()
    assert out.losses.mean().item() == pytest.approx(trl.item(), rel=1e-6)
    assert out.rewards.tolist() == pytest.approx((beta * ratio).tolist())


def test_kto_kl_term_pairs_each_prompt_with_the_previous_completion():
    # Three right-padded rows: prompt tokens (label IGNORE) then completion tokens; pad id 0.
    I = IGNORE  # noqa: E741
    batch = {"input_ids": torch.tensor([[11, 12, 13, 14, 0], [21, 22, 23, 24, 25], [31, 32, 33, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[I, I, 13, 14, I], [I, 22, 23, 24, 25], [I, I, 33, I, I]])}
    ids, mask, labels = mismatched_batch(batch, pad_id=0)
    # row 0: prompt 0 [11, 12] + completion 2 [33]; row 1: prompt 1 [21] + completion 0 [13, 14];
    # row 2: prompt 2 [31, 32] + completion 1 [22, 23, 24, 25]
    assert ids.tolist() == [[11, 12, 33, 0, 0, 0], [21, 13, 14, 0, 0, 0], [31, 32, 22, 23, 24, 25]]
    assert mask.sum(-1).tolist() == [3, 3, 6]
    assert labels.tolist() == [[I, I, 33, I, I, I], [I, 13, 14, I, I, I], [I, I, 22, 23, 24, 25]]
    # z0 = mean(policy - reference) on those sequences, floored at 0, as TRL.
    assert kl_estimate(torch.tensor([-3.0, -5.0, -4.0]), torch.tensor([-4.0, -5.5, -3.0])).item() == pytest.approx(0.5 / 3)
    module = SimpleNamespace(_trainer=None)
    assert KTOModule.batch_kl(module, torch.tensor([-5.0, -6.0]), torch.tensor([-4.0, -5.0])).item() == 0.0


@pytest.fixture()
def unpaired_data(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    data = PreferenceDataModule(tokenizer, source=str(source), val_size=0, test_size=0, batch_size=8,
                                max_length=64, cache=False, tokenization=UnpairedTokenizer())
    data.setup("fit")
    return data


def test_paired_rows_become_one_desirable_and_one_undesirable_example(unpaired_data):
    rows = unpaired_data.datasets["train"].rows
    assert len(rows) == 2 * len(PAIRS)
    assert sorted(r["label"] for r in rows) == [0.0] * len(PAIRS) + [1.0] * len(PAIRS)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_kto_step_zero_is_one_half_and_the_kl_is_zero(tiny, unpaired_data, adapter):
    model, _ = tiny
    module = KTOModule(policy(model, adapter), optimizer(1e-3))
    batch = next(iter(unpaired_data.train_dataloader()))
    loss, stats = module.step_stats(batch)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) for every example
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Capital of Peru?", "completion": "Lima."}, "KTO record 0 has no true/false label"),
    ({"prompt": "Capital of Peru?", "completion": "Lima.", "label": "yes"}, "KTO record 0 has no true/false label"),
    ({"prompt": "Capital of Peru?", "label": True}, r"KTO record 0 lacks \[completion\]"),
])
def test_kto_rows_without_a_label_are_refused(record, message):
    with pytest.raises(TunelabError, match=message):
        UnpairedTokenizer.normalize([record])


def test_unpaired_rows_are_read_as_they_come(tmp_path, tokenizer):
    rows = [{"prompt": "Capital of Peru?", "completion": "Lima.", "label": True},
            {"prompt": "Capital of Peru?", "completion": "Quito.", "label": False}]
    data = PreferenceDataModule(tokenizer, source=str(write_jsonl(tmp_path / "u.jsonl", rows * 4)), val_size=0,
                                test_size=0, batch_size=4, max_length=64, cache=False, tokenization=UnpairedTokenizer())
    data.setup("fit")
    assert [r["label"] for r in data.datasets["train"].rows].count(1.0) == 4


# ---------------------------------------------------------------- reference-free, options


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("build", [lambda m: ORPOModule(m, optimizer(1e-3)),
                                   lambda m: CPOModule(m, optimizer(1e-3), loss_type="simpo", cpo_alpha=0.0)],
                         ids=["orpo", "simpo"])
def test_reference_free_methods_build_no_reference(tiny, pairs_data, adapter, build, monkeypatch):
    import copy

    copies = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: (copies.append(x) if isinstance(x, torch.nn.Module) and any(True for _ in x.parameters())
                                                   else None) or real_deepcopy(x, *a))
    model, _ = tiny
    module = build(policy(model, adapter))
    assert module.ref_model is None and not copies
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.model.parameters())
    if adapter == "lora":  # nor is the adapter ever switched off to score a reference
        monkeypatch.setattr(type(module.model), "disable_adapter", lambda self: pytest.fail("reference used"))
    loss, _ = module.step_stats(next(iter(pairs_data.train_dataloader())))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "simpo", "simpo_gamma": -0.5}, r"simpo_gamma=-0.5 must be >= 0"),
    ({"loss_type": "dpo"}, "loss_type=dpo is unknown"),
    ({"beta": 0.0}, "beta=0.0 must be > 0"),
    ({"cpo_alpha": -1.0}, "cpo_alpha=-1.0 must be >= 0"),
])
def test_bad_cpo_options_are_refused(tiny, options, message):
    with pytest.raises(TunelabError, match=message):
        CPOModule(tiny[0], optimizer=None, **options)


def test_bad_kto_and_orpo_options_are_refused(tiny):
    with pytest.raises(TunelabError, match="desirable_weight=0.0 must be > 0"):
        KTOModule(tiny[0], optimizer=None, desirable_weight=0.0)
    with pytest.raises(TunelabError, match="beta=-1.0 must be > 0"):
        ORPOModule(tiny[0], optimizer=None, beta=-1.0)


def test_orpo_lowers_its_loss_on_four_pairs(tiny, pairs_data):
    import pytorch_lightning as pl

    pl.seed_everything(0)
    model, _ = tiny
    module = ORPOModule(policy(model, "lora"), optimizer(1e-2))
    batch = next(iter(pairs_data.train_dataloader()))
    opt = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])
    first = None
    for _ in range(8):
        loss, _ = module.step_stats(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


# ---------------------------------------------------------------- end to end


FAST_RUN = ["data.max_train_examples=16", "data.val_size=8", "data.test_size=8", "trainer.max_steps=2"]


@pytest.mark.parametrize("method, adapter", [
    ("kto", "lora"), ("orpo", "lora"), ("simpo", "lora"), ("orpo", "full"),
    pytest.param("kto", "full", marks=pytest.mark.slow), pytest.param("simpo", "full", marks=pytest.mark.slow),
    pytest.param("cpo", "lora", marks=pytest.mark.slow),
])
def test_method_and_adapter_train_end_to_end(tmp_path, method, adapter):
    run = tmp_path / "run"
    run_train(run, f"method={method}", f"adapter={adapter}", *FAST_RUN)
    metrics = read_metrics(run)
    assert {"test/accuracy", "test/logp_accuracy", "test/logps_chosen"} <= set(metrics["tuned"])
    assert metrics["base"]["test/accuracy"] == 0.5  # the start point is its own reference
    assert (run / "final").is_dir()


def test_kto_refuses_a_batch_of_one(tmp_path):
    with pytest.raises(TunelabError, match="method=kto needs data.batch_size >= 2"):
        run_train(tmp_path / "run", "method=kto", "data.batch_size=1", *FAST_RUN)
