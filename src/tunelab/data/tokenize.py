"""Turn examples into token ids and labels: per-example supervision (sft) or packed blocks (pretrain).

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


class PackedTokenizer:
    """Documents joined with EOS and cut into fixed-length blocks; every token is supervised."""

    def __init__(self, block_size: int | None = None):
        self.block_size = block_size

    def __call__(self, examples: list[Example], formatter: PromptFormatter, max_length: int):
        block = self.block_size or max_length
        stream: list[int] = []
        segments = [formatter.segments(example) for example in examples]
        for pieces in tokenize_segments(formatter.tokenizer, segments):
            for ids, _ in pieces:
                stream += ids
        rows = [stream[start : start + block] for start in range(0, len(stream), block)]
        rows = [{"input_ids": ids, "labels": list(ids)} for ids in rows if len(ids) > 1]
        report = TokenizeReport(kept=len(rows), notes=[f"{len(stream)} tokens packed into {len(rows)} blocks of {block}"])
        return rows, report
