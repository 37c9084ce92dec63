"""method=contrastive: InfoNCE against its closed forms, pair data in every accepted shape, bad input,
and the loss falling (retrieval rising) when a tiny model overfits a few pairs, with full and LoRA."""

from __future__ import annotations

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from tests.helpers import read_metrics, run_ddp, run_train, write_jsonl
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
    before = evaluator.run(model, pairs_data).metrics
    module = ContrastiveModule(model, partial(torch.optim.AdamW, lr=3e-3),
                               {"name": "constant"}, temperature=0.1, pooling=pooling)
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=pairs_data)
    result = evaluator.run(module.model, pairs_data)
    after, rows = result.metrics, result.rows
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


# ---------------------------------------------------------------- sentence-transformers backbone (the default)


def tiny_st(adapter: str):
    from peft import LoraConfig

    from tunelab.models.adapters import FullFineTuning, apply_adapter
    from tunelab.models.sentence import build_tiny_sentence_transformer

    spec = FullFineTuning() if adapter == "full" else LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                                target_modules=["query", "key", "value", "dense"])
    model, tokenizer = build_tiny_sentence_transformer(max_seq_length=32)
    return apply_adapter(model, spec), tokenizer


@pytest.fixture()
def st_pairs(tmp_path):
    def make(tokenizer):
        data = PairsDataModule(tokenizer, source=str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)), val_size=0,
                               test_size=0, batch_size=8, max_length=32, cache=False)
        data.setup("fit")
        return data
    return make


def test_method_contrastive_defaults_to_all_minilm_and_a_causal_lm_is_one_override_away(tmp_path):
    from tests.helpers import make_cfg

    cfg = make_cfg(tmp_path, "method=contrastive", fast=False)
    assert cfg.model._target_ == "tunelab.models.sentence.load_sentence_transformer"
    assert cfg.model.name_or_path is None and cfg.model.max_seq_length == cfg.data.max_length
    causal = make_cfg(tmp_path, "method=contrastive", "model=smollm2_135m", "method.module.pooling=last", fast=False)
    assert causal.model._target_ == "tunelab.models.load_pretrained" and causal.method.evaluator.pooling == "last"


def test_minilm_embeddings_are_sentence_transformers_own():
    """The packaged all-MiniLM-L6-v2 through the pair tokenizer, collator and `embed` gives what its
    SentenceTransformer.encode gives (its pooling and normalisation, its truncation at max_seq_length)."""
    from tunelab.models.sentence import load_sentence_transformer
    from tunelab.methods.contrastive import embed
    from tunelab.data.preference import PaddingCollator
    from tunelab.data.templates import PromptFormatter

    model, tokenizer = load_sentence_transformer(max_seq_length=16)
    texts = [p["anchor"] for p in PAIRS] + ["a text far longer than sixteen word pieces " * 4]
    rows, report = TextPairTokenizer()([TextPair(t, t) for t in texts], PromptFormatter(tokenizer, "{prompt}"), 16)
    assert report.truncated == 2 and rows[-1]["anchor_input_ids"][-1] == tokenizer.sep_token_id
    batch = PaddingCollator(tokenizer.pad_token_id)([{"input_ids": r["anchor_input_ids"]} for r in rows])
    with torch.no_grad():
        ours = embed(model.eval(), batch["input_ids"], batch["attention_mask"])
    theirs = model.encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_sentence_transformer_overfits_eight_pairs(st_pairs, adapter, one_thread):
    pl.seed_everything(0)  # BERT's dropout is on while training
    model, tokenizer = tiny_st(adapter)
    data = st_pairs(tokenizer)
    module = ContrastiveModule(model, partial(torch.optim.AdamW, lr=1e-2 if adapter == "lora" else 3e-3),
                               {"name": "constant"}, temperature=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".pooler." in n for n in trainable)  # no gradient reaches BERT's pooler: frozen for DDP
    if adapter == "lora":
        assert trainable and all("lora_" in n for n in trainable)
        assert any("attention.self.query" in n for n in trainable) and any("output.dense" in n for n in trainable)
    evaluator = RetrievalEvaluator(split="train", precision=None, temperature=0.1)
    before = evaluator.run(model, data).metrics
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    after = evaluator.run(module.model, data).metrics
    assert after["train/loss"] < 0.5 * before["train/loss"]
    assert after["train/accuracy_at_1"] > before["train/accuracy_at_1"] and after["train/accuracy_at_1"] >= 0.75


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_final_loads_in_sentence_transformers_with_the_embeddings_the_run_evaluated(tmp_path, adapter):
    """metrics.json's tuned retrieval numbers, recomputed from SentenceTransformer(final).encode alone."""
    from sentence_transformers import SentenceTransformer

    from tests.helpers import make_cfg
    from tunelab.methods.contrastive import retrieval_metrics

    run = tmp_path / "run"
    overrides = ["method=contrastive", "model=tiny_sentence_transformer", f"adapter={adapter}", "data.max_length=24",
                 "data.max_train_examples=32", "data.val_size=8", "data.test_size=16", "data.batch_size=8",
                 "trainer.max_steps=3", "optimizer.lr=1e-2"]
    run_train(run, *overrides)
    tuned = read_metrics(run)["tuned"]
    assert not (run / "final" / "adapter_config.json").exists()  # LoRA merged: a plain sentence-transformers folder
    final = SentenceTransformer(str(run / "final"), device="cpu")
    assert final.max_seq_length == 24
    test_pairs = [row["tuned"] for row in json_rows(run / "predictions.jsonl")]
    assert len(test_pairs) == 16
    anchors = final.encode([r["anchor"] for r in test_pairs], convert_to_tensor=True)
    positives = final.encode([r["positive"] for r in test_pairs], convert_to_tensor=True)
    again = retrieval_metrics(anchors, positives, 0.05, "test")
    for key in ("test/accuracy_at_1", "test/mrr", "test/loss"):
        assert again[key] == pytest.approx(tuned[key], abs=1e-4)
    base = instantiate_model(make_cfg(tmp_path / "base", *overrides))
    base_anchors = base.encode([r["anchor"] for r in test_pairs], convert_to_tensor=True)
    assert not torch.allclose(base_anchors, anchors, atol=1e-4)  # training changed the exported weights


def json_rows(path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def instantiate_model(cfg):
    from hydra.utils import instantiate

    return instantiate(cfg.model)[0]


def test_lora_with_modules_the_encoder_lacks_is_one_clear_error():
    from peft import LoraConfig

    from tunelab.models.adapters import apply_adapter
    from tunelab.models.sentence import build_tiny_sentence_transformer

    model, _ = build_tiny_sentence_transformer()
    with pytest.raises(TunelabError, match=r"cannot add LoRA to BertModel.*query, key, value, dense"):
        apply_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_a_folder_that_is_not_a_sentence_transformer_is_refused(tmp_path):
    from tunelab.models.sentence import load_sentence_transformer

    with pytest.raises(TunelabError, match="not a sentence-transformers folder"):
        load_sentence_transformer(str(tmp_path))


# ---------------------------------------------------------------- in-batch negatives across DDP ranks


def gathered_worker(rank: int, world: int, port: int, rows: dict, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mine = {k: v[rank::world].clone().requires_grad_(True) for k, v in rows.items()}  # the sampler's shards
    loss, _ = info_nce(mine["anchor"], mine["positive"], mine["negative"], 0.1, symmetric=True, gather=True)
    loss.backward()
    torch.save({"loss": loss.detach(), **{k: v.grad for k, v in mine.items()}}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_gathering_negatives_train_as_one_process_at_the_global_batch(tmp_path):
    """Real gloo processes: the loss DDP averages and each rank's gradients (after DDP's 1/world) are the
    one-process ones at the global batch, for uneven shards (9 pairs: 5 + 4), hard negatives, symmetric."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    rows = {k: F.normalize(torch.randn(9, 16), dim=-1) for k in ("anchor", "positive", "negative")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a fork of a process that has trained (thread pools, locks held by other threads) can hang
    mp.spawn(gathered_worker, args=(2, port, rows, str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank.{r}") for r in range(2)]

    whole = {k: v.clone().requires_grad_(True) for k, v in rows.items()}
    loss, _ = info_nce(whole["anchor"], whole["positive"], whole["negative"], 0.1, symmetric=True)
    loss.backward()
    assert sum(r["loss"] for r in ranks).item() / 2 == pytest.approx(loss.item(), rel=1e-5)
    for role in rows:
        for rank, got in enumerate(ranks):
            assert torch.allclose(got[role] / 2, whole[role].grad[rank::2], atol=1e-6), role
    # per-rank negatives (no gather) would be a different objective: the test can tell them apart
    alone = info_nce(rows["anchor"][0::2], rows["positive"][0::2], rows["negative"][0::2], 0.1, symmetric=True)[0]
    assert alone.item() != pytest.approx(ranks[0]["loss"].item(), rel=1e-3)


@pytest.mark.slow
def test_contrastive_on_two_ddp_processes_matches_one_process_at_the_global_batch(tmp_path):
    same = ["method=contrastive", "model=tiny_sentence_transformer", "model.dropout=0.0", "adapter=full",
            "trainer.precision=32-true", "optimizer.lr=1e-3", "scheduler.name=constant", "data.max_length=24",
            "data.max_train_examples=32", "data.val_size=8", "data.test_size=16", "trainer.max_steps=-1",
            "trainer.max_epochs=1", "trainer.limit_val_batches=null"]
    ddp = run_ddp(tmp_path / "ddp", "data.batch_size=4", *same)
    run_train(tmp_path / "single", "data.batch_size=8", *same)
    single = read_metrics(tmp_path / "single")
    assert ddp["train"]["global_step"] == single["train"]["global_step"] == 4  # 32 pairs / global batch 8
    assert ddp["base"]["test/loss"] == pytest.approx(single["base"]["test/loss"], rel=1e-5)
    # negatives gathered across ranks: the same updates, so the same tuned model and validation loss
    assert ddp["tuned"]["test/loss"] != pytest.approx(ddp["base"]["test/loss"], rel=1e-3)
    assert ddp["tuned"]["test/loss"] == pytest.approx(single["tuned"]["test/loss"], rel=1e-4)
    assert ddp["train"]["val/loss"] == pytest.approx(single["train"]["val/loss"], rel=1e-4)
