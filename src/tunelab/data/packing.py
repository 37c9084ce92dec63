"""Packing (`data.packing=true`): several tokenised examples share one row of at most `max_length` tokens.

`bfd` (best-fit decreasing, TRL's default and its own `pack_dataset`) keeps every example whole and
gives each its own position ids, restarting at 0. The model is then called with those position ids and
no 2-D attention mask, which transformers reads as packed documents: SDPA and eager get a block-diagonal
causal mask, FlashAttention the varlen kernel (cu_seqlens from the position ids), so no token attends
across a document edge. The first token of every document gets no label: it would be "predicted" from
the previous document's last token. Each token then sees exactly what it sees alone in its own row, so
the per-token losses and gradients equal the unpacked ones (`tunelab-verify` pair `packing`).

`wrapped` joins all examples into one stream and cuts it into rows: documents attend to each other
and examples are cut at row edges (the classic pretraining blocks; no per-document attention).
"""

from __future__ import annotations

from tunelab.data.tokenize import IGNORE
from tunelab.errors import TunelabError

STRATEGIES = ("bfd", "wrapped")


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise TunelabError(f"data.packing_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


def pack_rows(rows: list[dict], max_length: int, strategy: str = "bfd") -> list[dict]:
    """Rows of {input_ids, labels} packed into rows of at most max_length tokens; `bfd` rows also carry
    `position_ids` restarting at each document (which is what marks the documents)."""
    check_strategy(strategy)
    if not rows:
        return []
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    table = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    packed = pack_dataset(table, max_length, strategy=strategy).to_list()
    if strategy == "wrapped":
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in packed if len(r["input_ids"]) > 1]
    return [document_row(r["input_ids"], r["labels"], r["seq_lengths"]) for r in packed]


def document_row(input_ids: list[int], labels: list[int], lengths: list[int]) -> dict:
    """One packed row: position ids restart at each document, whose first token gets no label."""
    positions, labels = [], list(labels)
    for length in lengths:
        labels[len(positions)] = IGNORE  # never a target, as the first token of an unpacked row never is
        positions += range(length)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def document_lengths(position_ids) -> list[int]:
    """Lengths of the documents of one packed row, read back from its position ids."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:]) if b > a]


def pack_in_order(rows: list[dict], max_length: int) -> list[dict]:
    """Rows packed in their given order (next fit), as bfd packs them but keeping the order, so the packed
    tokens can be compared one to one with the unpacked ones (tunelab-verify's `packing` pair)."""
    packed, current = [], []
    for row in rows:
        if current and sum(len(r["input_ids"]) for r in current) + len(row["input_ids"]) > max_length:
            packed.append(current)
            current = []
        current.append(row)
    packed += [current] if current else []
    return [document_row([t for r in group for t in r["input_ids"]], [t for r in group for t in r["labels"]],
                         [len(r["input_ids"]) for r in group]) for group in packed]
