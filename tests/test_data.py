"""Formats, templates, label masks, packing, splits and readers, with the embedded tokenizer."""

import json

import pandas as pd
import pytest

from tests.helpers import write_jsonl
from tunelab.data.formats import Conversation, Document, normalize
from tunelab.data.sources import load_splits, split_records
from tunelab.data.templates import PromptFormatter
from tunelab.data.tokenize import IGNORE, SupervisedTokenizer
from tunelab.errors import TunelabError

PAIR = {"instruction": "Name the capital of Peru.", "input": "", "output": "The capital of Peru is Lima."}


def supervised_text(tokenizer, row):
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])


def test_response_and_its_eos_are_supervised_and_the_prompt_is_not(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the embedded model's trap
    examples = normalize([PAIR])
    rows, _ = SupervisedTokenizer()(examples, PromptFormatter(tokenizer), max_length=256)
    row = rows[0]
    target = supervised_text(tokenizer, row)
    assert target.startswith("The capital of Peru is Lima.<|im_end|>")
    assert tokenizer.eos_token_id in [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE]
    prompt_ids = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE]
    assert "Name the capital of Peru." in tokenizer.decode(prompt_ids)
    # the prompt is exactly what evaluation will feed the model
    prompt = PromptFormatter(tokenizer).generation_prompt(examples[0].prompt)
    assert tokenizer.decode(row["input_ids"]).startswith(prompt)


def test_train_on_prompt_supervises_everything(tokenizer):
    rows, _ = SupervisedTokenizer(train_on_prompt=True)(normalize([PAIR]), PromptFormatter(tokenizer), 256)
    assert rows[0]["labels"] == rows[0]["input_ids"]


def test_multi_turn_messages_supervise_every_assistant_turn(tokenizer):
    record = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Capital of Chad?"}, {"role": "assistant", "content": "N'Djamena."},
    ]}
    rows, _ = SupervisedTokenizer()(normalize([record]), PromptFormatter(tokenizer), 256)
    target = supervised_text(tokenizer, rows[0])
    assert "Hello there." in target and "N'Djamena." in target
    assert "Capital of Chad?" not in target and target.count("<|im_end|>") == 2


def test_custom_template_and_field_mapping(tokenizer):
    records = [{"question": "2+2?", "answer": "4"}]
    examples = normalize(records, fields={"prompt": "question", "completion": "answer"})
    formatter = PromptFormatter(tokenizer, "### Q:\n{prompt}\n### A:\n")
    rows, _ = SupervisedTokenizer()(examples, formatter, 64)
    assert tokenizer.decode(rows[0]["input_ids"]) == "### Q:\n2+2?\n### A:\n4<|im_end|>"
    assert supervised_text(tokenizer, rows[0]) == "4<|im_end|>"


def test_a_template_written_on_the_command_line_gets_real_newlines(tokenizer):
    # bash and Hydra pass `\n` as a backslash and an n: the template means newlines.
    formatter = PromptFormatter(tokenizer, r"### Q:\n{prompt}\n### A:\n")
    assert formatter.template == "### Q:\n{prompt}\n### A:\n"
    assert formatter.generation_prompt([{"role": "user", "content": "2+2?"}]) == "### Q:\n2+2?\n### A:\n"


@pytest.mark.parametrize("record, expected", [
    (PAIR, "Name the capital of Peru."),
    ({"instruction": "Translate.", "input": "hola", "output": "hello"}, "Translate.\n\nhola"),
    ({"prompt": "P?", "completion": "C."}, "P?"),
    ({"prompt": [{"role": "user", "content": "P?"}], "completion": [{"role": "assistant", "content": "C."}]}, "P?"),
    ({"messages": [{"role": "user", "content": "P?"}, {"role": "assistant", "content": "C."}]}, "P?"),
])
def test_formats_normalise_to_conversations(record, expected):
    (example,) = normalize([record])
    assert isinstance(example, Conversation)
    assert example.prompt[-1]["content"] == expected and example.reference


def test_text_format_is_a_document():
    assert normalize([{"text": "abc"}]) == [Document("abc")]


def test_truncation_keeps_max_length_and_drops_examples_with_no_response_left(tokenizer):
    long = {"instruction": "word " * 200, "output": "short answer"}
    rows, report = SupervisedTokenizer()(normalize([PAIR, long]), PromptFormatter(tokenizer), max_length=48)
    assert len(rows) == 1 and report.dropped_no_target == 1
    assert all(len(r["input_ids"]) <= 48 for r in rows)


def test_split_is_deterministic_from_the_seed():
    records = {"train": [{"i": i} for i in range(100)]}
    a = split_records(records, 0.1, 0.2, seed=3)
    b = split_records(records, 0.1, 0.2, seed=3)
    c = split_records(records, 0.1, 0.2, seed=4)
    assert a == b and a != c
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (70, 10, 20)
    assert not {r["i"] for r in a["train"]} & {r["i"] for r in a["test"]}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_file_types_load_the_same_records(tmp_path, suffix):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    assert load_splits(str(path))["train"] == rows


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(TunelabError, match=r"bad.jsonl:2: malformed JSON"):
        load_splits(str(path))


def test_malformed_json_gives_the_real_line_and_column(tmp_path):
    """Each JSON Lines line is parsed without its newline: an error at the end of a line used to be
    reported at "column 1" (of the newline's next line)."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "cut short",\n')
    with pytest.raises(TunelabError) as raised:
        load_splits(str(path))
    assert str(raised.value) == (f"{path}:2: malformed JSON (Expecting property name enclosed in double quotes at "
                                 "column 22), the line ends inside a record (JSON Lines needs each record on one "
                                 "line); fix or remove that line")
    whole = tmp_path / "bad.json"
    whole.write_text('[\n  {"text": "ok"},\n  {"text" "no colon"}\n]\n')
    with pytest.raises(TunelabError, match=r"bad.json:3: malformed JSON \(Expecting ':' delimiter at column 11\)"):
        load_splits(str(whole))
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(TunelabError, match=r"lines.json:2: malformed JSON \(Extra data at column 1\); one record "
                                           r"per line is JSON Lines: name the file .jsonl"):
        load_splits(str(lines))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_data_encoding_reads_a_latin1_file(tmp_path, suffix):
    text = {".jsonl": '{"text": "café"}\n', ".csv": "text\ncafé\n", ".txt": "café\n"}[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(TunelabError, match=r"latin1.*:\d+: byte 0xe9 .* not valid utf-8; set data.encoding"):
        load_splits(str(path))
    assert load_splits(str(path), encoding="latin-1")["train"] == [{"text": "café"}]


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n')
    assert load_splits(str(path))["train"] == [{"text": "a"}]


def test_missing_fields_say_which_are_missing_and_which_exist():
    with pytest.raises(TunelabError, match=r"records have fields \[question, answer\]"):
        normalize([{"question": "q", "answer": "a"}])
    with pytest.raises(TunelabError, match=r"needs fields \[completion\].*have \[prompt\]"):
        normalize([{"prompt": "q"}], fmt="prompt_completion")


def test_missing_file_and_chat_template_checks(tmp_path, tokenizer):
    with pytest.raises(TunelabError, match="does not exist"):
        load_splits(str(tmp_path / "nope.jsonl"))
    with pytest.raises(TunelabError, match="must contain"):
        PromptFormatter(tokenizer, "no placeholder")


def test_data_filter_keeps_records_whose_fields_match_in_every_split(tmp_path, tokenizer):
    from tunelab.data.preference import PreferenceDataModule
    from tunelab.data.sources import keep_matching

    chat = {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]}
    assert keep_matching({"train": [chat, {"messages": []}]}, {"messages": "Peru"})["train"] == [chat]
    rows = [{"prompt": f"Capital of country {i}?" if i % 2 else f"Write {i} in words.", "chosen": "A.",
             "rejected": "B."} for i in range(40)]
    data = PreferenceDataModule(tokenizer, source=str(write_jsonl(tmp_path / "p.jsonl", rows)), val_size=4,
                                test_size=4, max_length=64, cache=False, filter={"prompt": "^Capital"})
    data.setup("fit")
    kept = [p.prompt[-1]["content"] for split in ("train", "val", "test") for p in data.examples[split]]
    assert len(kept) == 20 and all(text.startswith("Capital") for text in kept)
    assert len(data.examples["test"]) == 4


@pytest.mark.parametrize("patterns, message", [
    ({"question": "x"}, "names field\\(s\\) question that the records do not have; they have prompt, chosen"),
    ({"prompt": "("}, "data.filter.prompt='\\(' is not a valid regular expression"),
    ({"prompt": "^Nothing"}, "keeps no training record of 2; loosen the patterns"),
])
def test_a_bad_data_filter_is_one_clear_error(patterns, message):
    from tunelab.data.sources import keep_matching

    records = {"train": [{"prompt": "Capital of Peru?", "chosen": "Lima."}, {"prompt": "Write 3.", "chosen": "3"}]}
    with pytest.raises(TunelabError, match=message):
        keep_matching(records, patterns)


@pytest.mark.parametrize("module, source", [("tunelab.data.preference.PreferenceDataModule", "tunelab:facts_preferences.jsonl"),
                                            ("tunelab.data.pairs.PairsDataModule", "tunelab:facts_instruct.jsonl")])
def test_every_kind_of_example_is_fingerprinted_and_cached(tmp_path, monkeypatch, tokenizer, module, source):
    """Preference pairs and text pairs go through the one setup: same fingerprints, same token cache."""
    import importlib

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    path, name = module.rsplit(".", 1)
    cls = getattr(importlib.import_module(path), name)

    def built(max_length=96):
        data = cls(tokenizer, source=source, val_size=4, test_size=4, batch_size=4, max_length=max_length,
                   max_train_examples=16)
        data.setup("fit")
        return data

    first = built()
    assert list((tmp_path / "data").glob("*")), "the tokenised splits were not cached"
    again = built()
    assert again.fingerprints == first.fingerprints
    assert again.datasets["train"].rows == first.datasets["train"].rows
    assert built(max_length=64).fingerprints["cache_key"] != first.fingerprints["cache_key"]


@pytest.mark.parametrize("method, data, fragment", [
    ("dpo", "custom", "preference record at {path}:8 has identical chosen and rejected responses"),
    ("kto", "custom", "preference record at {path}:8 has identical chosen and rejected responses"),
    ("contrastive", "custom", "pair record at {path}:8 has an empty positive text"),
])
def test_a_bad_record_is_named_by_its_file_line_after_the_split_shuffles_it(tmp_path, tokenizer, method, data, fragment):
    """The split shuffles records (line 8 is record 31-ish after it): the error names the line a user can open."""
    from tests.helpers import make_cfg
    from tunelab.run.assemble import build_datamodule

    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(40)]
    rows[7]["rejected" if method != "contrastive" else "chosen"] = "Answer 7." if method != "contrastive" else " "
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = make_cfg(tmp_path, f"method={method}", f"data={data}", f"data.source={path}", "data.cache=false",
                   "data.val_size=0.25", "data.test_size=0.25")
    with pytest.raises(TunelabError) as raised:
        build_datamodule(cfg, tokenizer).setup("fit")
    assert fragment.format(path=path) in str(raised.value), raised.value


def test_records_of_every_file_kind_carry_where_they_came_from(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    write_jsonl(tmp_path / "d.jsonl", rows)
    assert load_splits(str(tmp_path / "d.jsonl"))["train"][1].where == f"{tmp_path / 'd.jsonl'}:2"
    assert load_splits(str(tmp_path / "d.json"))["train"][1].where == f"{tmp_path / 'd.json'}, record 2"
    assert load_splits(str(tmp_path / "d.csv"))["train"][1].where == f"{tmp_path / 'd.csv'}, row 2"
    assert json.loads(json.dumps(load_splits(str(tmp_path / "d.csv"))["train"])) == rows  # still plain records
