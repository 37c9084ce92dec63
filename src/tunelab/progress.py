"""Progress that a log file can hold: when output is not a terminal (a pipe, `tee`, a cluster log),
progress bars print nothing useful, so plain lines say where long work stands."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from pytorch_lightning import Callback

log = logging.getLogger("tunelab")


def interactive() -> bool:
    """Whether a person watches a terminal (progress bars) or output goes to a file (plain lines)."""
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class PlainProgress(Callback):
    """A line every `every` optimizer steps: step, loss, seconds per step, time left."""

    def __init__(self, every: int):
        self.every = max(1, int(every))
        self.started = 0.0
        self.first_step = self.last_logged = self.total = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.first_step = time.perf_counter(), trainer.global_step
        self.last_logged, self.total = trainer.global_step, int(trainer.estimated_stepping_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, self.total
        # one line per `every` optimizer steps (micro-batches of an accumulated step share its number)
        if step == self.last_logged or (step % self.every and step != total):
            return
        self.last_logged = step
        per_step = (time.perf_counter() - self.started) / (step - self.first_step)
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f" loss {float(loss):.4f}" if loss is not None else ""
        log.info("step %d/%d%s, %.2f s/step, %s left", step, total, loss_text, per_step,
                 duration(per_step * max(0, total - step)))


class CountingProgress:
    """A plain line at each quarter of a long loop (generation, scoring) when not on a terminal."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.done = description, total, 0
        self.next_mark, self.started = 0.25, time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        if self.total and self.done / self.total >= self.next_mark:
            log.info("%s: %d/%d (%s)", self.description, self.done, self.total,
                     duration(time.perf_counter() - self.started))
            while self.next_mark <= self.done / self.total:
                self.next_mark += 0.25


class RichProgress:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """A transient bar on a terminal; plain lines at each quarter in a log file. Yields `.advance(n)`."""
    if not interactive():
        yield CountingProgress(description, total)
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        yield RichProgress(progress, progress.add_task(description, total=total))
