"""Text pairs (anchor, positive, optional hard negative) for contrastive fine-tuning of embeddings.

Records may use sentence-transformers' names (`anchor`, `positive`, `negative`), or any shape the
other methods read, taken as "a question and its answer": TRL preference rows (prompt -> chosen,
rejected as the hard negative), prompt/completion, alpaca (instruction + input -> output). A
`fields` mapping renames columns first. Texts are tokenised plainly (no chat template: an embedding
sees the text itself) and cut by the tokenizer's own truncation (a BERT text keeps its [SEP], as
sentence-transformers' encode does), with EOS appended where the tokenizer has one, so last-token
pooling of a causal LM reads a token that has seen everything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tunelab.data.datamodule import DataModule
from tunelab.data.formats import rename_fields
from tunelab.data.sources import record_name
from tunelab.data.tokenize import TokenizeReport
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

ROLES = ("anchor", "positive", "negative")


@dataclass(frozen=True)
class TextPair:
    anchor: str
    positive: str
    negative: str | None = None


def as_text(value) -> str:
    if isinstance(value, list):  # conversational: the last message is the text
        value = value[-1]["content"] if value else ""
    return "" if value is None else str(value).strip()


def to_text_pair(record: dict, index: int) -> TextPair:
    if "anchor" in record or "positive" in record:
        texts = {role: record.get(role) for role in ROLES}
    elif "chosen" in record:
        texts = {"anchor": record.get("prompt"), "positive": record.get("chosen"), "negative": record.get("rejected")}
    elif "completion" in record:
        texts = {"anchor": record.get("prompt"), "positive": record.get("completion")}
    elif "instruction" in record:
        question = "\n".join(as_text(record.get(k)) for k in ("instruction", "input") if as_text(record.get(k)))
        texts = {"anchor": question, "positive": record.get("output")}
    else:
        raise TunelabError(
            f"{record_name(record, index, 'pair record')} has fields [{', '.join(map(str, record))}]; contrastive data needs anchor and "
            "positive (optional negative), or prompt+chosen(+rejected), prompt+completion, instruction+output; "
            "map your columns with data.fields, e.g. data.fields={anchor:question,positive:answer}"
        )
    pair = {role: as_text(texts.get(role)) for role in ROLES}
    for role in ("anchor", "positive"):
        if not pair[role]:
            raise TunelabError(f"{record_name(record, index, 'pair record')} has an empty {role} text; remove it or "
                               f"fix the data (record: {str(dict(record))[:120]})")
    return TextPair(pair["anchor"], pair["positive"], pair["negative"] or None)


def normalize_text_pairs(records: list[dict], fields: dict | None = None) -> list[TextPair]:
    return [to_text_pair(rename_fields(r, fields), i) for i, r in enumerate(records)]


class TextPairTokenizer:
    """Rows of anchor_/positive_(/negative_)input_ids; a negative is kept only if every pair has one."""

    def __init__(self, add_eos: bool = True, use_negatives: bool = True):
        self.add_eos, self.use_negatives = add_eos, use_negatives

    def __call__(self, pairs: list[TextPair], formatter, max_length: int):
        tokenizer = formatter.tokenizer
        report = TokenizeReport()
        roles = ["anchor", "positive"]
        if self.use_negatives and pairs and all(p.negative for p in pairs):
            roles.append("negative")
        eos = [tokenizer.eos_token_id] if self.add_eos and tokenizer.eos_token_id is not None else []
        encoded = {}
        for role in roles:
            encoded[role], cut = self.encode(tokenizer, [getattr(p, role) for p in pairs], max_length - len(eos))
            report.truncated += cut
        rows = []
        for i in range(len(pairs)):
            row = {f"{role}_input_ids": encoded[role][i] + eos for role in roles}
            # The batch sampler groups by `input_ids` length and counts `labels`; neither is trained on.
            rows.append(row | {"input_ids": row["anchor_input_ids"], "labels": row["anchor_input_ids"]})
        report.kept = len(rows)
        return rows, report

    @staticmethod
    def encode(tokenizer, texts: list[str], limit: int) -> tuple[list[list[int]], int]:
        """(token ids of each text within `limit`, how many were cut)."""
        if not texts:
            return [], 0
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        long = [i for i, row in enumerate(ids) if len(row) > limit]
        if long:
            cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=limit)
            for i, row in zip(long, cut["input_ids"]):
                ids[i] = row
        return ids, len(long)


class PairsDataModule(DataModule):
    """`DataModule` over text pairs: same arguments, splits and batches; rows from `TextPairTokenizer`."""

    min_per_rank = 2  # a pair alone in a batch has no negatives: such a last batch of an epoch is dropped

    def __init__(self, *args, tokenization=None, **kwargs):
        from tunelab.data.preference import PaddingCollator

        kwargs["template"] = "{prompt}"  # pairs are tokenised plainly: no chat template (an encoder has none)
        super().__init__(*args, tokenization=tokenization or TextPairTokenizer(), **kwargs)
        if self.batch_size < 2:
            raise TunelabError(f"data.batch_size={self.batch_size}: contrastive learning needs at least 2 pairs per "
                               "batch (the other pairs are the negatives); raise it")
        self.collator = PaddingCollator(self.tokenizer.pad_token_id)

    kind = "pairs"

    def normalize(self, records: list[dict]) -> list[TextPair]:
        return normalize_text_pairs(records, self.fields)

    def check_split(self, name: str, records: list[dict], rows: list[dict], report) -> None:
        if report.truncated:
            log.info("%s: %d texts cut to data.max_length=%d", name, report.truncated, self.max_length)

    def conversations(self, split: str) -> list:
        return []  # pairs are not prompts with reference responses
