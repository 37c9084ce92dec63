"""Loaders for the shipped lm-eval tasks (`custom_dataset: !function utils.load_*` in their YAML).

The JSONL files are read from beside this file rather than through `dataset_path: json`, whose
`data_files` lm-eval would resolve against the working directory, not the package."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_split(name: str):
    from datasets import Dataset

    return Dataset.from_list([json.loads(line) for line in (HERE / name).read_text().splitlines() if line])


def load_facts_mc(**_metadata):
    from datasets import DatasetDict

    return DatasetDict({"test": read_split("facts_mc.jsonl")})


def load_facts_gen(**_metadata):
    from datasets import DatasetDict

    return DatasetDict({"train": read_split("facts_gen_train.jsonl"), "test": read_split("facts_gen_test.jsonl")})
