"""method=reward: preference data, Bradley-Terry maths, last-token scores, a real run and its final/."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import read_metrics, run_train, write_jsonl
from tunelab.data.preference import PairTokenizer, PreferenceDataModule, normalize_pairs
from tunelab.errors import TunelabError
from tunelab.methods.reward_model import as_reward_model, bradley_terry_loss, load_reward_model, reward_scores


def test_bradley_terry_is_ln2_at_equal_rewards():
    r = torch.tensor([0.3, -1.2, 5.0])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))
    # a margin asks for more separation: equal rewards then cost more than ln 2
    assert bradley_terry_loss(r, r, margin=1.0).item() == pytest.approx(math.log(1 + math.e))
    # centring adds mean((r_c + r_r)^2)
    assert bradley_terry_loss(r, r, centering=0.5).item() == pytest.approx(math.log(2) + 0.5 * (4 * r**2).mean().item())
    assert bradley_terry_loss(torch.tensor([10.0]), torch.tensor([-10.0])).item() < 1e-6


def test_plain_conversational_and_implicit_prompt_pairs_agree():
    plain = {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito."}
    chat = {"prompt": [{"role": "user", "content": "Capital of Peru?"}],
            "chosen": [{"role": "assistant", "content": "Lima."}],
            "rejected": [{"role": "assistant", "content": "Quito."}]}
    implicit = {"chosen": chat["prompt"] + chat["chosen"], "rejected": chat["prompt"] + chat["rejected"]}
    renamed = {"q": "Capital of Peru?", "good": "Lima.", "bad": "Quito."}
    pairs = normalize_pairs([plain, chat, implicit])
    pairs += normalize_pairs([renamed], fields={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert all(p == pairs[0] for p in pairs)
    assert pairs[0].reference == "Lima."


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical chosen and rejected"),
    ({"prompt": "p", "chosen": "a"}, r"lacks \[rejected\]"),
    ({"chosen": "a", "rejected": "b"}, "has no prompt"),
])
def test_bad_preference_rows_are_refused(record, message):
    with pytest.raises(TunelabError, match=message):
        normalize_pairs([record])


def test_pair_rows_supervise_the_response_and_its_end_of_turn(tokenizer):
    from tunelab.data.templates import PromptFormatter

    pairs = normalize_pairs([{"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito, I think."}])
    rows, report = PairTokenizer()(pairs, PromptFormatter(tokenizer), 128)
    row = rows[0]
    supervised = [t for t, label in zip(row["chosen_input_ids"], row["chosen_labels"]) if label != -100]
    assert tokenizer.decode(supervised).startswith("Lima.")
    assert supervised[-2] == tokenizer.eos_token_id  # <|im_end|> closes the turn and is learned
    prompt = len(row["chosen_input_ids"]) - len(supervised)
    assert row["chosen_input_ids"][:prompt] == row["rejected_input_ids"][:prompt]
    assert all(label == -100 for label in row["rejected_labels"][:prompt])
    assert report.kept == 1


@pytest.fixture(scope="module")
def tiny_reward_model():
    from tunelab.models import build_tiny_llama

    model, tok = build_tiny_llama()
    return as_reward_model(model, tok).eval(), tok


def test_score_is_read_at_the_true_last_token_whatever_the_padding(tiny_reward_model):
    model, tok = tiny_reward_model
    eos = tok.eos_token_id
    short = [5, 6, 7, eos]  # ends with <|im_end|>, which is also the pad token
    long = [8, 9, 10, 11, 12, 13, eos, 14]
    alone = reward_scores(model, torch.tensor([short]), torch.ones(1, 4, dtype=torch.long))
    right = reward_scores(model, torch.tensor([short + [eos] * 4, long]),
                          torch.tensor([[1] * 4 + [0] * 4, [1] * 8]))
    left = reward_scores(model, torch.tensor([long, [eos] * 4 + short]), torch.tensor([[1] * 8, [0] * 4 + [1] * 4]))
    assert torch.allclose(alone[0], right[0], atol=1e-5)
    assert torch.allclose(alone[0], left[1], atol=1e-5)
    assert torch.allclose(right[1], left[0], atol=1e-5)
    # the final EOS counts: dropping it changes the score (transformers' own pooling would skip it)
    without_eos = reward_scores(model, torch.tensor([short[:-1]]), torch.ones(1, 3, dtype=torch.long))
    assert not torch.allclose(alone, without_eos)


def test_preference_datamodule_batches_pairs(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": f"Wrong answer number {i}."} for i in range(12)])
    dm = PreferenceDataModule(tokenizer, str(source), val_size=2, test_size=2, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_input_ids"].shape[0] == 4
    assert batch["rejected_attention_mask"].sum(1).min() > 0
    assert len(dm.conversations("test")) == 2


@pytest.mark.parametrize("adapter", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_reward_run_reports_accuracy_and_final_loads_on_its_own(tmp_path, adapter):
    run_dir = tmp_path / "run"
    run_train(run_dir, "method=reward", f"adapter={adapter}", "trainer.max_steps=8", "data.max_train_examples=64",
              "eval.max_examples=4")
    metrics = read_metrics(run_dir)
    tuned = metrics["tuned"]
    for key in ("test/accuracy", "test/margin", "test/loss"):
        assert key in tuned and math.isfinite(tuned[key])
    assert "val/accuracy" in metrics["train"]
    model, tok = load_reward_model(run_dir)
    batch = tok(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"], return_tensors="pt")
    score = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    assert score.shape == (1,) and torch.isfinite(score).all()


def test_a_run_that_is_not_a_reward_model_is_refused(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(TunelabError, match="not a reward model"):
        load_reward_model(tmp_path)
