"""method=contrastive: InfoNCE against its closed forms, pair data in every accepted shape, bad input,
and the loss falling (retrieval rising) when a tiny model overfits a few pairs, with full and LoRA."""

from __future__ import annotations

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from tests.helpers import read_metrics, run_train, write_jsonl
from tunelab.data.pairs import PairsDataModule, TextPair, TextPairTokenizer, normalize_text_pairs
from tunelab.errors import TunelabError
from tunelab.methods.contrastive import ContrastiveModule, RetrievalEvaluator, info_nce


def test_info_nce_is_log_batch_size_for_identical_embeddings():
    same = F.normalize(torch.ones(4, 8), dim=-1)
    assert info_nce(same, same)[0].item() == pytest.approx(math.log(4))
    assert info_nce(same, same, negative=same)[0].item() == pytest.approx(math.log(8))  # 4 positives + 4 negatives
    assert info_nce(same, same, symmetric=True)[0].item() == pytest.approx(math.log(4))
    eye = torch.eye(4)  # each anchor equals its positive and is orthogonal to the rest
    loss, accuracy = info_nce(eye, eye, temperature=0.5)
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 3)))
    assert accuracy.item() == 1.0


def test_batch_of_one_is_refused():
    with pytest.raises(TunelabError, match="at least 2 pairs per batch"):
        info_nce(torch.ones(1, 8), torch.ones(1, 8))


def test_every_record_shape_becomes_the_same_pair():
    records = [{"anchor": "Capital of Peru?", "positive": "Lima."},
               {"prompt": "Capital of Peru?", "completion": "Lima."},
               {"instruction": "Capital of Peru?", "input": "", "output": "Lima."},
               {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito."}]
    pairs = normalize_text_pairs(records) + normalize_text_pairs([{"q": "Capital of Peru?", "a": "Lima."}],
                                                                 fields={"anchor": "q", "positive": "a"})
    assert all(p.anchor == "Capital of Peru?" and p.positive == "Lima." for p in pairs)
    assert pairs[3].negative == "Quito." and pairs[0].negative is None


@pytest.mark.parametrize("record, message", [
    ({"anchor": "  ", "positive": "x"}, "empty anchor"),
    ({"anchor": "x", "positive": ""}, "empty positive"),
    ({"text": "just text"}, "needs anchor and positive"),
])
def test_bad_pairs_are_refused(record, message):
    with pytest.raises(TunelabError, match=message):
        normalize_text_pairs([record])


def test_rows_end_with_eos_and_keep_negatives_only_when_all_have_one(tokenizer):
    from tunelab.data.templates import PromptFormatter

    formatter = PromptFormatter(tokenizer)
    with_neg = [TextPair("a question", "an answer", "a wrong answer")] * 2
    rows, _ = TextPairTokenizer()(with_neg, formatter, 64)
    assert rows[0]["anchor_input_ids"][-1] == tokenizer.eos_token_id
    assert "negative_input_ids" in rows[0]
    rows, _ = TextPairTokenizer()(with_neg + [TextPair("q", "a")], formatter, 64)
    assert "negative_input_ids" not in rows[0]
    rows, report = TextPairTokenizer()([TextPair("word " * 50, "a")], formatter, 8)
    assert len(rows[0]["anchor_input_ids"]) == 8 and report.truncated == 1


# ---------------------------------------------------------------- on a tiny model

PAIRS = [{"anchor": q, "positive": a} for q, a in [
    ("Capital of Peru?", "Lima is the capital."), ("Symbol of iron?", "Fe is its symbol."),
    ("Opposite of hot?", "Cold is the opposite."), ("Three in words?", "three"),
    ("Largest ocean?", "The Pacific Ocean."), ("Colour of the sky?", "Blue on a clear day."),
    ("Capital of Japan?", "Tokyo is the capital."), ("Seven times six?", "Forty-two."),
]]


@pytest.fixture()
def pairs_data(tmp_path, tokenizer):
    data = PairsDataModule(tokenizer, source=str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)), val_size=0,
                           test_size=0, batch_size=8, max_length=32, cache=False)
    data.setup("fit")
    return data


@pytest.mark.parametrize("adapter, pooling", [("full", "mean"), ("lora", "last")])
def test_overfitting_eight_pairs_lowers_the_loss(tokenizer, pairs_data, adapter, pooling):
    from peft import LoraConfig

    from tunelab.models import build_tiny_llama
    from tunelab.models.adapters import FullFineTuning, apply_adapter

    spec = FullFineTuning() if adapter == "full" else LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    model = apply_adapter(build_tiny_llama()[0], spec)
    evaluator = RetrievalEvaluator(split="train", precision=None, pooling=pooling, temperature=0.1)
    before, _ = evaluator.run(model, pairs_data)
    module = ContrastiveModule(model, partial(torch.optim.AdamW, lr=1e-2 if adapter == "lora" else 3e-3),
                               {"name": "constant"}, temperature=0.1, pooling=pooling)
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=pairs_data)
    after, rows = evaluator.run(module.model, pairs_data)
    assert after["train/loss"] < 0.5 * before["train/loss"]
    assert after["train/accuracy_at_1"] > before["train/accuracy_at_1"] and after["train/accuracy_at_1"] >= 0.75
    assert after["train/mrr"] > before["train/mrr"] and {"anchor", "retrieved", "rank"} <= set(rows[0])


def test_contrastive_run_end_to_end(tmp_path):
    run = tmp_path / "run"
    run_train(run, "method=contrastive", "data.max_train_examples=32", "data.val_size=8", "data.test_size=16",
              "data.batch_size=8", "trainer.max_steps=3")
    metrics = read_metrics(run)
    for stage in ("base", "tuned"):
        assert {"test/accuracy_at_1", "test/mrr", "test/loss"} <= set(metrics[stage])
    assert metrics["base"]["test/chance_accuracy_at_1"] == pytest.approx(1 / 16)
    assert (run / "final" / "adapter_config.json").is_file()


def test_batch_size_one_is_refused_before_anything_runs(tmp_path, tokenizer):
    source = str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    with pytest.raises(TunelabError, match="data.batch_size=1: contrastive learning needs at least 2"):
        PairsDataModule(tokenizer, source=source, batch_size=1)
