"""What metrics.json says of training (time, peak memory, the last logged values), kept in every
checkpoint so that a resumed run reports the whole run, not only its last part."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
from pytorch_lightning import Callback

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start a new high-water mark, so a job of a multirun measures its own peak, not the process's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_tokens(batch) -> dict[str, int]:
    """Non-pad tokens of a training batch: its prefixed attention masks (chosen_, rejected_, KL pairs) where it
    has any (then the plain `attention_mask` repeats the chosen one), else its `attention_mask`."""
    if not isinstance(batch, dict):
        return {"tokens_processed": 0}
    masks = {k: v for k, v in batch.items() if k.endswith("attention_mask") and torch.is_tensor(v)}
    if len(masks) > 1:
        masks.pop("attention_mask", None)
    return {"tokens_processed": int(sum(int(m.sum()) for m in masks.values()))}


class TrainingSummary(Callback):
    """Fit seconds and peak memory summed / maxed over every segment of a resumed run, tokens processed
    (summed over ranks: the cost side of a method comparison), and the last value of every logged scalar
    (a run resumed after training has none of its own). On-policy methods count their own tokens
    (`take_token_counts`: trained on, and sampled); the others count their training batches."""

    KEY = "tunelab_training_summary"

    def __init__(self):
        self.earlier_seconds, self.earlier_peak = 0.0, 0.0
        self.metrics: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.started: float | None = None
        self.ended: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started, self.ended = time.perf_counter(), None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.ended = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        take = getattr(pl_module, "take_token_counts", None)
        counts = take() if take else batch_tokens(batch)
        if trainer.world_size > 1:
            counts = {k: int(trainer.strategy.reduce(torch.tensor(v, dtype=torch.float64, device=pl_module.device),
                                                     reduce_op="sum")) for k, v in counts.items()}
        for key, value in counts.items():
            self.tokens[key] = self.tokens.get(key, 0) + value

    def fit_seconds(self) -> float:
        if self.started is None:
            return self.earlier_seconds
        return self.earlier_seconds + (self.ended or time.perf_counter()) - self.started

    def peak_memory_mb(self) -> float:
        return max(self.earlier_peak, peak_memory_mb())

    def logged(self, trainer) -> dict[str, float]:
        current = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        return self.metrics | current

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = {"fit_seconds": self.fit_seconds(), "peak_memory_mb": self.peak_memory_mb(),
                                "metrics": self.logged(trainer), "tokens": dict(self.tokens)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(self.KEY) or {}
        self.earlier_seconds = float(saved.get("fit_seconds", 0.0))
        self.earlier_peak = float(saved.get("peak_memory_mb", 0.0))
        self.metrics = dict(saved.get("metrics") or {})
        self.tokens = dict(saved.get("tokens") or {})
        self.started = time.perf_counter()  # this segment's time starts at the restore

    def summary(self, trainer) -> dict:
        return {"fit_seconds": self.fit_seconds(), "global_step": trainer.global_step,
                "peak_memory_mb": self.peak_memory_mb(), **self.tokens, **self.logged(trainer)}
