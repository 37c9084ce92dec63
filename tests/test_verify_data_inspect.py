"""`tunelab-data inspect`: the supervised tokens it marks are exactly the response and its end-of-turn."""

from __future__ import annotations

import pytest

from tunelab.cli.data import CLOSE, OPEN, main, plain, spans
from tunelab.data import DataModule, SupervisedTokenizer


def test_marks_the_response_and_end_of_turn_only(tokenizer):
    datamodule = DataModule(tokenizer, source="tunelab:facts_instruct.jsonl", max_length=256)
    datamodule.setup("fit")
    conversation = datamodule.examples["train"][0]
    segments = spans(tokenizer, datamodule.datasets["train"].rows[0])
    marked = [text for text, supervised in segments if supervised]
    # SmolLM2's template ends a turn with "<|im_end|>\n", and the newline is supervised too.
    assert len(marked) == 1 and marked[0].startswith(conversation.reference + "<|im_end|>")
    unmarked = "".join(text for text, supervised in segments if not supervised)
    assert conversation.messages[0]["content"] in unmarked and conversation.reference not in unmarked

    everything = DataModule(tokenizer, source="tunelab:facts_instruct.jsonl", max_length=256,
                            tokenization=SupervisedTokenizer(train_on_prompt=True))
    everything.setup("fit")
    rendered = plain(spans(tokenizer, everything.datasets["train"].rows[0]))
    assert rendered.count(OPEN) == 1 and rendered.startswith("<|im_start|>" + OPEN)  # the first token is never a target


def test_cli_prints_marked_examples_and_refuses_an_unknown_split(capsys):
    main(["inspect", "model=tiny_llama", "data.max_length=96", "--n", "2", "--plain"])
    out = capsys.readouterr().out
    assert out.count("--- example") == 2 and OPEN in out and CLOSE in out and "supervised" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "model=tiny_llama", "--split", "nope"])
    assert exit_info.value.code == 2
    assert "split 'nope'" in capsys.readouterr().err


def test_a_preference_pair_shows_both_sequences_each_with_its_response_marked(capsys):
    main(["inspect", "model=tiny_llama", "method=dpo", "data.max_length=96", "--n", "1", "--plain"])
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("--- example")]
    assert [h.split(":")[0] for h in headers] == ["--- example 0", "--- example 0"]
    assert ": chosen:" in headers[0] and ": rejected:" in headers[1], headers
    chosen, rejected = out.split(headers[1])
    assert OPEN in chosen and OPEN in rejected
    marked = [part.split(CLOSE)[0] for part in (chosen, rejected)]
    assert marked[0] != marked[1]  # two different responses, each marked as the target of its sequence
