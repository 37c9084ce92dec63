"""Preference pairs (prompt, chosen, rejected) for reward models, DPO-style methods and RL prompts.

Accepted as TRL writes them: plain strings, or message lists (conversational); the prompt may be
implicit in chosen/rejected (TRL's `extract_prompt` takes the longest shared prefix of turns). A
`fields` mapping renames columns first. Each pair becomes a `PreferencePair`; tokenizers then turn
pairs into rows:

- `PairTokenizer`: chosen and rejected sequences with label masks on the response tokens (reward, DPO);
- `PromptTokenizer`: the prompt alone with the chosen response as reference text (PPO rollouts).

`PreferenceDataModule` takes the same arguments as `DataModule`, so a data config selects it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tunelab.data.datamodule import DataModule
from tunelab.data.formats import Conversation, rename_fields
from tunelab.data.sources import record_name
from tunelab.data.tokenize import IGNORE, TokenizeReport, tokenize_segments
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

PREFERENCE_FIELDS = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages) and two assistant continuations, the first preferred."""

    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...]
    rejected: tuple[dict, ...]

    def conversation(self, which: str) -> Conversation:
        return Conversation(self.prompt + getattr(self, which))

    @property
    def reference(self) -> str:
        """The preferred answer as text: the ground truth of RL experiments on preference data."""
        return self.chosen[-1]["content"]


def as_turns(value, role: str) -> tuple[dict, ...]:
    if isinstance(value, list):  # TRL's conversational form
        return tuple({"role": m["role"], "content": str(m["content"])} for m in value)
    return ({"role": role, "content": str(value)},)


def to_pair(record: dict, index: int, system_prompt: str | None = None) -> PreferencePair:
    from trl.data_utils import extract_prompt

    name = record_name(record, index, "preference record")
    missing = [key for key in PREFERENCE_FIELDS if key not in record or record[key] in (None, "", [])]
    if missing:
        raise TunelabError(
            f"{name} lacks [{', '.join(missing)}] (it has [{', '.join(map(str, record))}]); "
            "each needs prompt (optional when implicit), chosen and rejected; map columns with data.fields, "
            f"e.g. data.fields={{{missing[0]}:COLUMN}}"
        )
    if "prompt" not in record:
        if not isinstance(record["chosen"], list):
            raise TunelabError(
                f"{name} has no prompt; plain-text chosen/rejected need a prompt field "
                "(only conversational pairs may carry the prompt inside chosen/rejected)"
            )
        record = {**record, **extract_prompt(record)}
    prompt = as_turns(record["prompt"], "user")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = ({"role": "system", "content": system_prompt},) + prompt
    chosen, rejected = as_turns(record["chosen"], "assistant"), as_turns(record["rejected"], "assistant")
    if chosen == rejected:
        raise TunelabError(
            f"{name} has identical chosen and rejected responses ({chosen[-1]['content'][:60]!r}); "
            "such a pair teaches nothing: remove it from the data"
        )
    for part, turns in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not turns[-1]["content"].strip():
            raise TunelabError(f"{name} has an empty {part} text; remove it or fix the data "
                               f"(record: {str(dict(record))[:120]})")
    for part, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise TunelabError(f"{name}: the last {part} message must be an assistant turn")
    return PreferencePair(prompt, chosen, rejected)


def normalize_pairs(records: list[dict], fields: dict | None = None, system_prompt: str | None = None) -> list[PreferencePair]:
    return [to_pair(rename_fields(r, fields), i, system_prompt) for i, r in enumerate(records)]


def sequence_with_labels(pieces: list[tuple[list[int], bool]], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input ids, labels on the response tokens, truncated?) for one rendered conversation."""
    input_ids, labels = [], []
    for ids, supervised in pieces:
        input_ids += ids
        labels += ids if supervised else [IGNORE] * len(ids)
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


class PairTokenizer:
    """Rows of chosen_/rejected_ input ids and labels; pairs whose responses are cut away are dropped."""

    def __call__(self, pairs: list[PreferencePair], formatter, max_length: int):
        report = TokenizeReport()
        segments = [formatter.segments(p.conversation(which)) for p in pairs for which in PREFERENCE_FIELDS]
        pieces = tokenize_segments(formatter.tokenizer, segments)
        rows = []
        for chosen_pieces, rejected_pieces in zip(pieces[0::2], pieces[1::2]):
            row, keep = {}, True
            for name, part in (("chosen", chosen_pieces), ("rejected", rejected_pieces)):
                ids, labels, truncated = sequence_with_labels(part, max_length)
                report.truncated += truncated
                keep &= any(label != IGNORE for label in labels[1:])
                row |= {f"{name}_input_ids": ids, f"{name}_labels": labels}
            if not keep:
                report.dropped_no_target += 1
                continue
            # The batch sampler groups by `input_ids` length and counts `labels` targets.
            longer = max(PREFERENCE_FIELDS, key=lambda n: len(row[f"{n}_input_ids"]))
            rows.append(row | {"input_ids": row[f"{longer}_input_ids"], "labels": row[f"{longer}_labels"]})
        report.kept = len(rows)
        return rows, report


@dataclass(frozen=True)
class UnpairedExample:
    """A prompt and one assistant continuation labelled desirable (True) or undesirable (False): KTO's data."""

    prompt: tuple[dict, ...]
    completion: tuple[dict, ...]
    label: bool

    def conversation(self, which: str | None = None) -> Conversation:
        return Conversation(self.prompt + self.completion)

    @property
    def reference(self) -> str:
        return self.completion[-1]["content"]


def to_unpaired(record: dict, index: int, system_prompt: str | None = None) -> UnpairedExample:
    name = record_name(record, index, "KTO record")
    missing = [key for key in ("prompt", "completion") if record.get(key) in (None, "", [])]
    if missing:
        raise TunelabError(f"{name} lacks [{', '.join(missing)}] (it has [{', '.join(map(str, record))}]); "
                           "each needs prompt, completion and label, or chosen and rejected (split into both)")
    if not isinstance(record.get("label"), bool):
        raise TunelabError(f"{name} has no true/false label (got {record.get('label')!r}); label: true "
                           "marks a desirable completion, false an undesirable one")
    prompt = as_turns(record["prompt"], "user")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = ({"role": "system", "content": system_prompt},) + prompt
    return UnpairedExample(prompt, as_turns(record["completion"], "assistant"), record["label"])


class UnpairedTokenizer:
    """KTO's rows: input ids, labels on the completion and `label` (1.0 desirable, 0.0 undesirable). Paired
    records stay PreferencePairs among the examples (so evaluation can still rank pairs) and become two rows,
    chosen desirable and rejected undesirable, as TRL's `unpair_preference_dataset`."""

    @staticmethod
    def normalize(records: list[dict], fields: dict | None = None, system_prompt: str | None = None) -> list:
        out = []
        for i, record in enumerate(records):
            record = rename_fields(record, fields)
            paired = "chosen" in record or "rejected" in record
            out.append(to_pair(record, i, system_prompt) if paired else to_unpaired(record, i, system_prompt))
        return out

    def __call__(self, examples: list, formatter, max_length: int):
        report = TokenizeReport()
        unpaired = [u for e in examples for u in self.split(e)]
        pieces = tokenize_segments(formatter.tokenizer, [formatter.segments(u.conversation()) for u in unpaired])
        rows = []
        for example, part in zip(unpaired, pieces):
            ids, labels, truncated = sequence_with_labels(part, max_length)
            report.truncated += truncated
            if not any(label != IGNORE for label in labels[1:]):
                report.dropped_no_target += 1
                continue
            rows.append({"input_ids": ids, "labels": labels, "label": float(example.label)})
        report.kept = len(rows)
        return rows, report

    @staticmethod
    def split(example) -> list[UnpairedExample]:
        if isinstance(example, UnpairedExample):
            return [example]
        return [UnpairedExample(example.prompt, example.chosen, True), UnpairedExample(example.prompt, example.rejected, False)]


class PromptTokenizer:
    """Rows of prompt ids (what a policy continues from) plus prompt and reference text, for RL."""

    def __call__(self, examples: list, formatter, max_length: int):
        report = TokenizeReport()
        prompts, references = [], []
        for example in examples:
            messages = list(example.prompt)
            prompts.append(formatter.generation_prompt(messages))
            references.append(example.reference)
        ids = formatter.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        rows = []
        for prompt_ids, text, reference in zip(ids, prompts, references):
            if len(prompt_ids) > max_length:  # a cut prompt would be a different question: drop it
                report.dropped_no_target += 1
                continue
            rows.append({"input_ids": prompt_ids, "labels": [IGNORE] * len(prompt_ids),
                         "prompt": text, "reference": reference})
        report.kept = len(rows)
        return rows, report


class PaddingCollator:
    """Pads every `*input_ids` field (with its attention mask and labels); strings pass through as lists.

    `padding_side="left"` is for generation: prompts then end at the same position."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def pad(self, sequences: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        out = torch.full((len(sequences), width), value, dtype=torch.long)
        for i, seq in enumerate(sequences):
            if self.padding_side == "left":
                out[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            else:
                out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out

    def __call__(self, rows: list[dict]) -> dict:
        batch = {}
        for key in rows[0]:
            if not key.endswith("input_ids"):
                continue
            prefix = key.removesuffix("input_ids")
            batch[key] = self.pad([r[key] for r in rows], self.pad_token_id)
            batch[f"{prefix}attention_mask"] = self.pad([[1] * len(r[key]) for r in rows], 0)
            if f"{prefix}labels" in rows[0]:
                batch[f"{prefix}labels"] = self.pad([r[f"{prefix}labels"] for r in rows], IGNORE)
        for key, value in rows[0].items():
            if isinstance(value, str):
                batch[key] = [r[key] for r in rows]
            elif isinstance(value, float):  # per-row scalars, e.g. DPO's precomputed reference log-probs
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        if rows[0].get("step_tokens") is not None:
            batch["step_tokens"] = torch.tensor(rows[0]["step_tokens"], dtype=torch.float32)
        return batch


class PreferenceDataModule(DataModule):
    """`DataModule` for preference pairs: same arguments, same splits and batches; pairs instead of
    conversations, and a tokenization (from the method config) that decides what a row is."""

    def __init__(self, *args, padding_side: str = "right", tokenization=None, **kwargs):
        super().__init__(*args, tokenization=tokenization or PairTokenizer(), **kwargs)
        if self.format not in ("auto", "preference"):
            raise TunelabError(f"data.format={self.format} does not fit preference data; use auto or preference")
        self.collator = PaddingCollator(self.tokenizer.pad_token_id, padding_side)

    kind = "preference data"

    def normalize(self, records: list[dict]) -> list:
        normalize = getattr(self.tokenization, "normalize", normalize_pairs)  # KTO also reads unpaired rows
        return normalize(records, self.fields, self.system_prompt)

    def check_split(self, name: str, records: list[dict], rows: list[dict], report) -> None:
        if report.dropped_no_target:
            log.warning("%s: dropped %d pairs that do not fit data.max_length=%d",
                        name, report.dropped_no_target, self.max_length)
        if records and not rows:
            raise TunelabError(f"no {name} pair fits data.max_length={self.max_length}; raise it")

    def conversations(self, split: str) -> list[Conversation]:
        """The chosen conversations: what a supervised evaluator compares generations against."""
        return [p.conversation("chosen") for p in self.examples.get(split, []) if getattr(p, "label", True)]
