"""Batches that are resumable mid-epoch, shard across DDP ranks, and carry the step's token count.

Every batch knows how many supervised tokens its whole optimizer step holds (all accumulation
micro-batches on all ranks), so the loss can be the exact token-weighted mean of that step: batch B
with accumulation k then equals batch B*k, and 2 ranks equal 1 process at the same global batch.
"""

from __future__ import annotations

import random

import torch
from pytorch_lightning import Callback
from torch.utils.data import DataLoader, Dataset, Sampler

from tunelab.data.tokenize import IGNORE


class TokenizedDataset(Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.lengths = [len(r["input_ids"]) for r in rows]
        # Targets are labels shifted by one: the first position is never predicted.
        self.targets = [sum(label != IGNORE for label in r["labels"][1:]) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        # The batch sampler hands out (index, step_tokens); plain integer access works too.
        index, step_tokens = key if isinstance(key, tuple) else (key, None)
        return {**self.rows[index], "step_tokens": step_tokens}


def world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StepBatchSampler(Sampler):
    """Seeded, optionally length-grouped batches, sharded by rank, grouped into optimizer steps."""

    def __init__(self, dataset: TokenizedDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 group_by_length: bool = True, accumulate: int = 1, megabatch_factor: int = 32,
                 shard: bool = True, min_per_rank: int = 1):
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.accumulate = max(1, int(accumulate))
        self.megabatch_factor = megabatch_factor
        self.shard = shard  # False: this process sees every example (evaluation on one rank)
        self.min_per_rank = min_per_rank  # a last batch with fewer examples per rank is dropped
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained on before a resume
        self.sampler = self  # Lightning calls set_epoch on `batch_sampler.sampler`

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def order(self) -> list[int]:
        indices = list(range(len(self.dataset)))
        if not self.shuffle:
            return indices
        rng = random.Random(self.seed * 100_003 + self.epoch)
        rng.shuffle(indices)
        if self.group_by_length:
            # Sort within megabatches so batches hold similar lengths (less padding), then shuffle
            # the batches so lengths do not trend over the epoch.
            lengths = self.dataset.lengths
            # Sized by the global batch, so N ranks at batch B group exactly as 1 process at N*B.
            size = self.batch_size * self.world()[1] * self.megabatch_factor
            mega = [sorted(indices[i : i + size], key=lambda j: -lengths[j]) for i in range(0, len(indices), size)]
            indices = [j for chunk in mega for j in chunk]
        return indices

    def world(self) -> tuple[int, int]:
        return world() if self.shard else (0, 1)

    def global_batches(self) -> list[list[list[int]]]:
        """Global batches, each a list of per-rank index lists."""
        _, size = self.world()
        order = self.order()
        step = self.batch_size * size
        chunks = [order[start : start + step] for start in range(0, len(order), step)]
        if self.shuffle and self.group_by_length:
            random.Random(self.seed * 7919 + self.epoch).shuffle(chunks)
        # A chunk too small to give every rank an example (min_per_rank) is dropped (DistributedSampler
        # would pad); after the shuffle, so the other batches keep the order one process at N*B sees.
        return [[chunk[r::size] for r in range(size)] for chunk in chunks if len(chunk) >= size * self.min_per_rank]

    def __iter__(self):
        rank, _ = self.world()
        batches = self.global_batches()
        targets = self.dataset.targets
        skip, self.skip = self.skip, 0
        for start in range(0, len(batches), self.accumulate):
            group = batches[start : start + self.accumulate]
            step_tokens = sum(targets[j] for batch in group for shard in batch for j in shard)
            for offset, batch in enumerate(group):
                if start + offset >= skip:
                    yield [(j, step_tokens) for j in batch[rank]]

    def __len__(self) -> int:
        return len(self.global_batches())


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside the epoch goes into Lightning checkpoints."""

    batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        sampler = self.batch_sampler
        epoch, done = state["epoch"], state["batches_done"]
        if done >= len(sampler):  # saved at the very end of an epoch: the next one starts clean
            epoch, done = epoch + 1, 0
        sampler.epoch, sampler.skip = epoch, done


class TrackDataProgress(Callback):
    """Records how many batches of the epoch reached a training step (the fetcher runs ahead)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            loader.batches_done = batch_idx + 1


class Collator:
    """Right-pads a list of rows into tensors; padding is masked by attention and labels.

    Packed rows (data.packing=true, tunelab.data.packing) also carry `position_ids`; their padding gets
    position ids of its own (0, 1, ...), so it forms a separate document that no real token attends to.
    Their `attention_mask` marks real tokens only: the model is called without it (tunelab.core.losses
    .model_inputs), since a 2-D mask would make transformers ignore the document edges.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        packed = "position_ids" in rows[0]
        position_ids = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
            if packed:
                position_ids[i, :n] = torch.tensor(row["position_ids"])
                position_ids[i, n:] = torch.arange(width - n)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if packed:
            batch["position_ids"] = position_ids
        if rows[0].get("step_tokens") is not None:
            batch["step_tokens"] = torch.tensor(rows[0]["step_tokens"], dtype=torch.float32)
        return batch
