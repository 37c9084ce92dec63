"""data.packing=true: examples packed into rows with per-document attention give the unpacked losses and gradients."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers import make_cfg
from tests.test_speed_equivalence import RECORDS as SPEED_RECORDS
from tunelab.data.batching import Collator
from tunelab.data.formats import normalize
from tunelab.data.packing import document_lengths, pack_in_order, pack_rows
from tunelab.data.templates import PromptFormatter
from tunelab.data.tokenize import IGNORE, DocumentTokenizer, SupervisedTokenizer
from tunelab.methods.base import CausalLMModule
from tunelab.models.tiny import build_tiny_llama

RECORDS = [*SPEED_RECORDS, {"instruction": "Name a primary colour.", "output": "Blue."}]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows(tokenizer):
    rows, _ = SupervisedTokenizer()(normalize(RECORDS, "auto", {}, None), PromptFormatter(tokenizer, "chat"), 128)
    return rows


def test_bfd_keeps_every_example_whole_with_its_own_positions_and_no_label_across_an_edge(rows):
    packed = pack_rows(rows, max_length=128)
    assert len(packed) < len(rows) and all(len(r["input_ids"]) <= 128 for r in packed)
    documents = []
    for row in packed:
        lengths = document_lengths(row["position_ids"])
        assert row["position_ids"] == [p for n in lengths for p in range(n)]
        start = 0
        for n in lengths:
            assert row["labels"][start] == IGNORE  # a document's first token is never a target
            documents.append((row["input_ids"][start : start + n], row["labels"][start + 1 : start + n]))
            start += n
    # Every example is there once, whole, with the labels it had (its first one was never a target anyway).
    assert sorted(documents) == sorted((r["input_ids"], r["labels"][1:]) for r in rows)


def test_wrapped_joins_the_stream_into_full_rows(rows):
    packed = pack_rows(rows, max_length=64, strategy="wrapped")
    assert all(len(r["input_ids"]) == 64 for r in packed[:-1]) and "position_ids" not in packed[0]
    assert [t for r in packed for t in r["input_ids"]] == [t for r in rows for t in r["input_ids"]]


def test_documents_longer_than_a_row_are_cut_into_rows_and_every_token_is_supervised(tokenizer):
    # 4, 3 and 3 tokens with their EOS: rows of 2 cut the first document in two, the others into 2 + 1, and a
    # 1-token piece has nothing to predict, so it goes.
    docs = normalize([{"text": "alpha beta gamma"}, {"text": "delta epsilon"}, {"text": "zeta"}])
    rows, report = DocumentTokenizer(block_size=2)(docs, PromptFormatter(tokenizer), max_length=999)
    assert [len(r["input_ids"]) for r in rows] == [2, 2, 2, 2] and report.truncated == 3
    assert all(r["labels"] == r["input_ids"] for r in rows)
    assert tokenizer.decode(rows[0]["input_ids"] + rows[1]["input_ids"]) == "alpha beta gamma<|im_end|>"


def tiny(adapter: str):
    model, _ = build_tiny_llama(hidden_size=64, num_hidden_layers=2, intermediate_size=128, seed=1)
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    return model


def loss_and_grads(mod: CausalLMModule, batch: dict):
    mod.zero_grad(set_to_none=True)
    loss_sum, tokens = mod.loss_sum(batch)
    loss_sum.backward()
    return loss_sum.detach(), int(tokens), torch.cat([p.grad.flatten() for p in mod.parameters() if p.grad is not None])


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("head_on_supervised_only", [True, False], ids=["split", "logits"])
def test_a_packed_batch_gives_the_unpacked_loss_and_gradients(rows, tokenizer, adapter, head_on_supervised_only):
    collate = Collator(tokenizer.pad_token_id)
    unpacked, packed = collate(rows), collate(pack_in_order(rows, 128))
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0] and "position_ids" in packed
    mod = CausalLMModule(tiny(adapter), functools.partial(torch.optim.AdamW, lr=1e-3),
                         head_on_supervised_only=head_on_supervised_only)
    loss_a, tokens_a, grads_a = loss_and_grads(mod, unpacked)
    loss_b, tokens_b, grads_b = loss_and_grads(mod, packed)
    assert tokens_a == tokens_b > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    assert (grads_b - grads_a).norm() / grads_a.norm() < 1e-5
    # The same batch read with a plain 2-D mask lets documents attend to each other: the check can fail.
    crossed = {k: v for k, v in packed.items() if k != "position_ids"}
    _, _, grads_c = loss_and_grads(mod, crossed)
    assert (grads_c - grads_a).norm() / grads_a.norm() > 1e-3


def test_per_token_losses_match_one_to_one(rows, tokenizer):
    from tunelab.core.losses import model_inputs

    collate = Collator(tokenizer.pad_token_id)
    model = tiny("full").eval()

    def token_losses(batch):
        with torch.no_grad():
            logits = model(**model_inputs(model, batch)).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits[targets != IGNORE], targets[targets != IGNORE], reduction="none")

    packed = collate(pack_in_order(rows, 128))
    a, b = token_losses(collate(rows)), token_losses(packed)
    assert a.shape == b.shape and len(a) > 20
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    crossed = token_losses({k: v for k, v in packed.items() if k != "position_ids"})  # documents see each other
    assert (crossed - a).abs().max() > 1e-3


def test_packing_a_datamodule_packs_the_training_split_only(tmp_path, tokenizer):
    from tunelab.run.assemble import build_datamodule

    plain = build_datamodule(make_cfg(tmp_path, "data.max_length=256"), tokenizer)
    packed = build_datamodule(make_cfg(tmp_path, "data.max_length=256", "data.packing=true"), tokenizer)
    train_a, train_b = plain.datasets["train"], packed.datasets["train"]
    assert len(train_b) < len(train_a) / 2 and sum(train_b.targets) == sum(train_a.targets)
    assert len(packed.datasets["val"]) == len(plain.datasets["val"])  # evaluators read one example per row
    batch = next(iter(packed.train_dataloader()))
    assert "position_ids" in batch and batch["input_ids"].shape[1] <= 256
    assert float(batch["step_tokens"]) == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_packing_data_another_method_reads_is_one_clear_error(tmp_path, tokenizer):
    from tunelab.errors import TunelabError
    from tunelab.run.assemble import build_datamodule

    with pytest.raises(TunelabError, match="data.packing=true packs one-sequence-per-example data"):
        build_datamodule(make_cfg(tmp_path, "method=dpo", "data.packing=true"), tokenizer)
    with pytest.raises(TunelabError, match="packing_strategy must be one of bfd, wrapped"):
        build_datamodule(make_cfg(tmp_path, "data.packing=true", "data.packing_strategy=nope"), tokenizer)


def test_sft_trains_packed_end_to_end(tmp_path):
    """(pretrain on data=facts_corpus, packed by default, trains in tests/test_train.py.)"""
    from tests.helpers import read_metrics, run_train

    run_train(tmp_path, "data.packing=true", "trainer.max_steps=2", "eval.max_examples=2", "trainer.limit_val_batches=1")
    assert read_metrics(tmp_path)["train"]["global_step"] == 2
