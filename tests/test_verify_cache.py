"""The tokenised-data cache: keyed by data, tokenizer, template and preprocessing, and nothing else."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from tests.helpers import make_cfg
from tunelab.data import DataModule, SupervisedTokenizer
from tunelab.data.cache import TokenCache, cache_key
from tunelab.data.sources import load_splits, split_records


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


@pytest.fixture
def tokenize_calls(monkeypatch):
    calls = []
    real = SupervisedTokenizer.__call__

    def counting(self, examples, formatter, max_length):
        calls.append(len(examples))
        return real(self, examples, formatter, max_length)

    monkeypatch.setattr(SupervisedTokenizer, "__call__", counting)
    return calls


def setup(tokenizer, **kwargs) -> DataModule:
    datamodule = DataModule(tokenizer, source="tunelab:facts_instruct.jsonl", **{"max_length": 64, **kwargs})
    datamodule.setup("fit")
    return datamodule


def test_second_setup_reuses_the_tokens_without_tokenising(tokenizer, cache_home, tokenize_calls):
    first = setup(tokenizer)
    assert tokenize_calls and len(list(cache_home.glob("*.pkl"))) == 1
    tokenize_calls.clear()
    second = setup(tokenizer, batch_size=3, seed=7)  # batching settings are not part of the key
    assert tokenize_calls == []
    for split in ("train", "val", "test"):
        assert second.datasets[split].rows == first.datasets[split].rows
        assert second.examples[split] == first.examples[split]
    assert second.conversations("test") == first.conversations("test")


@pytest.mark.parametrize("change", [
    {"template": "### Q:\n{prompt}\n### A:\n"},
    {"max_length": 48},
    {"system_prompt": "Be brief."},
    {"tokenization": SupervisedTokenizer(train_on_prompt=True)},
    {"split_seed": 1},
])
def test_a_change_to_what_makes_the_tokens_is_a_miss(tokenizer, cache_home, tokenize_calls, change):
    setup(tokenizer)
    tokenize_calls.clear()
    changed = setup(tokenizer, **{"max_length": 64, **change})
    assert tokenize_calls, f"{change} reused another configuration's tokens"
    assert len(list(cache_home.glob("*.pkl"))) == 2
    assert changed.datasets["train"].rows


def test_another_tokenizer_or_chat_template_is_a_miss(tokenizer, cache_home, tokenize_calls):
    import copy

    setup(tokenizer)
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    tokenize_calls.clear()
    setup(other)
    assert tokenize_calls
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["<tunelab_new_token>"])
    tokenize_calls.clear()
    setup(extended)
    assert tokenize_calls


def test_run_dir_and_learning_rate_do_not_change_the_key(tmp_path, tokenizer):
    def key(run_dir, *overrides):
        cfg = make_cfg(tmp_path / run_dir, *overrides)
        datamodule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all",
                                 tokenization=instantiate(cfg.method.tokenization, _convert_="all"))
        splits = split_records(load_splits(datamodule.source), datamodule.val_size, datamodule.test_size,
                               datamodule.split_seed)
        splits["train"] = splits["train"][: datamodule.max_train_examples]
        return cache_key(datamodule, splits)

    base = key("a")
    assert key("b", "optimizer.lr=0.5", "data.batch_size=3", "trainer.max_steps=9") == base
    assert key("c", "data.template='Q: {prompt} A: '") != base
    assert key("d", "method.tokenization.train_on_prompt=true") != base


def test_a_damaged_entry_is_a_miss_and_is_rewritten(tokenizer, cache_home, tokenize_calls):
    setup(tokenizer)
    (entry,) = cache_home.glob("*.pkl")
    entry.write_bytes(b"not a pickle")
    tokenize_calls.clear()
    again = setup(tokenizer)
    assert tokenize_calls and again.datasets["train"].rows
    assert TokenCache(entry.stem, cache_home).load() is not None


def test_cache_off_always_tokenises(tokenizer, cache_home, tokenize_calls):
    setup(tokenizer, cache=False)
    setup(tokenizer, cache=False)
    assert len(tokenize_calls) == 6 and not cache_home.exists()
