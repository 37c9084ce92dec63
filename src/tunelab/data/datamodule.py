"""The datamodule: load -> map fields -> template -> tokenize with label masks -> split -> batches."""

from __future__ import annotations

import logging

import pytorch_lightning as pl

from tunelab.data.batching import Collator, ResumableDataLoader, StepBatchSampler, TokenizedDataset
from tunelab.data.cache import TokenCache, data_fingerprints
from tunelab.data.formats import Conversation, normalize
from tunelab.data.sources import keep_matching, load_splits, split_records
from tunelab.data.templates import PromptFormatter
from tunelab.data.tokenize import SupervisedTokenizer
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


class DataModule(pl.LightningDataModule):
    min_per_rank = 1  # fewest examples a batch may give each rank (a smaller last batch is dropped)

    def __init__(
        self,
        tokenizer,
        source: str,
        subset: str | None = None,
        format: str = "auto",
        fields: dict | None = None,
        template: str = "chat",
        system_prompt: str | None = None,
        max_length: int = 256,
        val_size: float = 0.1,
        test_size: float = 0.1,
        split_seed: int = 0,
        max_train_examples: int | None = None,
        filter: dict | None = None,  # noqa: A002 (the config key users write: data.filter={prompt: REGEX})
        batch_size: int = 8,
        eval_batch_size: int = 16,
        group_by_length: bool = True,
        pad_to_multiple_of: int | None = None,
        packing: bool = False,
        packing_strategy: str = "bfd",
        num_workers: int = 0,
        seed: int = 0,
        accumulate_grad_batches: int = 1,
        tokenization=None,
        cache: bool = True,
        encoding: str = "utf-8",
    ):
        super().__init__()
        self.cache = cache  # reuse tokenised splits from TUNELAB_CACHE/data (tunelab.data.cache)
        self.tokenizer = tokenizer
        self.source, self.subset, self.format = source, subset, format
        self.encoding = encoding  # of a local text file (JSONL, JSON, CSV, TXT)
        self.fields = dict(fields or {})
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.val_size, self.test_size, self.split_seed = val_size, test_size, split_seed
        self.max_train_examples = max_train_examples
        self.filter = dict(filter or {})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.group_by_length = group_by_length
        self.packing, self.packing_strategy = packing, packing_strategy  # tunelab.data.packing
        self.num_workers, self.seed = num_workers, seed
        self.accumulate_grad_batches = accumulate_grad_batches
        self.tokenization = tokenization or SupervisedTokenizer()
        self.formatter = PromptFormatter(tokenizer, template)
        self.collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of)
        self.examples: dict[str, list] = {}
        self.datasets: dict[str, TokenizedDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Records -> normalised examples -> token rows, for every kind of example (the subclasses say how
        a record is normalised and what an empty result means); fingerprinted and cached the same way."""
        if self.datasets:
            return
        if self.max_length < 2:
            raise TunelabError(f"data.max_length={self.max_length} is too small; use at least a few dozen tokens")
        splits = self.record_splits()
        self.fingerprints = data_fingerprints(self, splits)  # for the cache key and the run's manifest
        cache = TokenCache(self.fingerprints["cache_key"]) if self.cache else None
        cached = cache.load() if cache else None
        if cached is not None:
            log.info("data: tokenised splits reused from the cache (%s)", cache.path)
        for name, records in splits.items():
            if cached is not None:
                self.examples[name], rows = cached[name]
            else:
                self.examples[name] = self.normalize(records)
                rows, report = self.tokenization(self.examples[name], self.formatter, self.max_length)
                self.check_split(name, records, rows, report)
            self.datasets[name] = TokenizedDataset(rows)
        if cache and cached is None and self.datasets["train"].rows:
            cache.save({name: (self.examples[name], self.datasets[name].rows) for name in splits})
        if self.packing:
            self.pack_train_split()
        if not self.datasets["train"].rows:
            raise TunelabError(f"the training split of {self.source} is empty; check the data and its filters")
        log.info("%s: %s", self.kind, ", ".join(f"{k}={len(v)}" for k, v in self.datasets.items()))

    kind = "data"  # the examples' kind, in log lines

    def pack_train_split(self) -> None:
        """data.packing=true: the training rows packed (tunelab.data.packing); validation and test stay one
        example per row, so every evaluator reads them as before."""
        from tunelab.data.packing import check_strategy, pack_rows

        check_strategy(self.packing_strategy)
        if not getattr(self.tokenization, "packable", False):
            raise TunelabError(f"data.packing=true packs one-sequence-per-example data (method=sft, pretrain); "
                               f"{type(self.tokenization).__name__} makes another kind of row: set data.packing=false")
        rows = self.datasets["train"].rows
        packed = pack_rows(rows, self.max_length, self.packing_strategy)
        log.info("data: %d training examples packed (%s) into %d rows of at most %d tokens",
                 len(rows), self.packing_strategy, len(packed), self.max_length)
        self.datasets["train"] = TokenizedDataset(packed)

    def normalize(self, records: list[dict]) -> list:
        return normalize(records, self.format, self.fields, self.system_prompt)

    def check_split(self, name: str, records: list[dict], rows: list[dict], report) -> None:
        """Warn about examples tokenisation dropped; refuse a split it emptied."""
        if report.dropped_no_target:
            log.warning("%s: dropped %d examples with no response left after truncation to max_length=%d",
                        name, report.dropped_no_target, self.max_length)
        if not rows and records:
            raise TunelabError(
                f"no {name} example keeps any response token within data.max_length={self.max_length}; "
                "raise data.max_length or shorten the prompts"
            )

    def record_splits(self) -> dict[str, list[dict]]:
        """The raw records of train/val/test: loaded, filtered by data.filter, split, train capped."""
        splits = keep_matching(load_splits(self.source, self.subset, self.encoding), self.filter)
        splits = split_records(splits, self.val_size, self.test_size, self.split_seed)
        if self.max_train_examples:
            splits["train"] = splits["train"][: self.max_train_examples]
        return splits

    def loader(self, split: str, train: bool, shard: bool = True) -> ResumableDataLoader:
        dataset = self.datasets[split]
        sampler = StepBatchSampler(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            group_by_length=self.group_by_length,
            accumulate=self.accumulate_grad_batches if train else 1,
            shard=shard,
            min_per_rank=self.min_per_rank,
        )
        return ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=self.collator,
                                   num_workers=self.num_workers)

    def train_dataloader(self):
        return self.loader("train", train=True)

    def val_dataloader(self):
        return self.loader("val", train=False) if self.datasets.get("val") and self.datasets["val"].rows else []

    def test_dataloader(self):
        return self.loader("test", train=False)

    def conversations(self, split: str) -> list[Conversation]:
        """The split's examples that have a reference response (for generation metrics)."""
        return [e for e in self.examples.get(split, []) if isinstance(e, Conversation) and e.reference is not None]
