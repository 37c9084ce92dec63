"""Turn examples into token ids and labels: per-example supervision (sft) or every token of a document (pretrain).

Both give one row per example (`packable`): data.packing=true then packs the rows (tunelab.data.packing).

Labels are -100 where the loss must not look. They are built from the segment marks, never from
token ids, so an EOS that doubles as pad is still supervised where it ends a response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.data.formats import Example
from tunelab.data.templates import PromptFormatter

IGNORE = -100


@dataclass
class TokenizeReport:
    kept: int = 0
    dropped_no_target: int = 0
    truncated: int = 0
    notes: list[str] = field(default_factory=list)


def tokenize_segments(tokenizer, segments_per_example: list[list[tuple[str, bool]]]) -> list[list[tuple[list[int], bool]]]:
    """Token ids for every segment, in one batched tokenizer call."""
    flat = [text for segments in segments_per_example for text, _ in segments]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    result, position = [], 0
    for segments in segments_per_example:
        result.append([(ids[position + i], sup) for i, (_, sup) in enumerate(segments)])
        position += len(segments)
    return result


class SupervisedTokenizer:
    """One example per sequence; the loss sees the responses (and everything if train_on_prompt)."""

    packable = True  # rows are whole examples of input_ids/labels, which data.packing may pack

    def __init__(self, train_on_prompt: bool = False):
        self.train_on_prompt = train_on_prompt

    def __call__(self, examples: list[Example], formatter: PromptFormatter, max_length: int):
        report = TokenizeReport()
        rows = []
        segments = [formatter.segments(example) for example in examples]
        for pieces in tokenize_segments(formatter.tokenizer, segments):
            input_ids, labels = [], []
            for ids, supervised in pieces:
                input_ids += ids
                labels += ids if (supervised or self.train_on_prompt) else [IGNORE] * len(ids)
            if len(input_ids) > max_length:
                report.truncated += 1
                input_ids, labels = input_ids[:max_length], labels[:max_length]
            # The first position is never predicted, so a target there does not count.
            if all(label == IGNORE for label in labels[1:]):
                report.dropped_no_target += 1
                continue
            rows.append({"input_ids": input_ids, "labels": labels})
        report.kept = len(rows)
        return rows, report


class DocumentTokenizer:
    """One row per document, every token supervised; a document longer than block_size is cut into
    pieces of block_size tokens, each its own row (TRL's `bfd_split`), so no token is lost.

    data.packing=true packs the rows with per-document attention (`bfd`), or joins them into one stream cut
    into rows (`wrapped`: the classic pretraining blocks, documents attending to each other)."""

    packable = True

    def __init__(self, block_size: int | None = None):
        self.block_size = block_size

    def __call__(self, examples: list[Example], formatter: PromptFormatter, max_length: int):
        block = self.block_size or max_length
        segments = [formatter.segments(example) for example in examples]
        rows, report = [], TokenizeReport()
        for pieces in tokenize_segments(formatter.tokenizer, segments):
            ids = [t for piece, _ in pieces for t in piece]
            report.truncated += len(ids) > block
            rows += [{"input_ids": ids[start : start + block], "labels": ids[start : start + block]}
                     for start in range(0, len(ids), block) if len(ids[start : start + block]) > 1]
        report.kept = len(rows)
        report.notes.append(f"{len(examples)} documents in {len(rows)} rows of at most {block} tokens")
        return rows, report
