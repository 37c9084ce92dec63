"""A kill loses at most the step in flight (and, after training, nothing: the end of fit is saved too): SIGTERM (schedulers, preemption, `kill`) and SIGINT (Ctrl+C)
during training finish the optimizer step under way, save a resumable checkpoint, and end the run as
interrupted; `ckpt_path=auto` continues it to the same weights an uninterrupted run reaches.

Lightning alone stops at the next *batch* and saves nothing, so a SIGTERM in the middle of gradient
accumulation would lose the accumulated gradients, and every step since the last periodic checkpoint.
Here the signal is only noted; at the next optimizer-step boundary Lightning's own stop flag is set
(in DDP it reaches the other ranks through Lightning's per-batch broadcast from rank 0), Lightning
raises SIGTERMException, and `on_exception` saves `checkpoints/last.ckpt` on every rank. A second
Ctrl+C stops at once. SLURM's requeue signal (SIGUSR1) stays Lightning's: it saves an hpc checkpoint
in the run dir, which `ckpt_path=auto` also finds.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from pytorch_lightning import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger("tunelab")

EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class RunInterrupted(SystemExit):
    """The run stopped on a signal; its code is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(EXIT_CODES.get(signum, 1))
        self.signum, self.message = signum, message


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class CheckpointOnInterrupt(Callback):
    """Turns SIGTERM/SIGINT during fit into a checkpoint at the next optimizer-step boundary."""

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"
        self.pending: int | None = None  # the signal received, until the step under way ends
        self.received: int | None = None
        self.saved: Path | None = None
        self.previous: dict[int, object] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its own handlers (at fit start): these replace them while training.
        for signum in EXIT_CODES:
            self.previous[signum] = signal.signal(signum, self.note_signal)
        self.rank = trainer.global_rank

    def note_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.pending is not None:
            raise KeyboardInterrupt  # the second Ctrl+C: stop now
        if self.received is None:
            log.warning("%s received: finishing the step under way, then saving a checkpoint%s",
                        signal_name(signum), " (Ctrl+C again to stop at once)" if signum == signal.SIGINT else "")
        self.pending = self.received = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.pending is None or self.rank != 0:
            return  # ranks > 0 stop when rank 0's flag reaches them (Lightning broadcasts it every batch)
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches
        if step_done:
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after this hook

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.restore_handlers()
        if isinstance(exception, SIGTERMException):
            self.received = self.received or signal.SIGTERM  # another rank's signal, broadcast by Lightning
            trainer.save_checkpoint(self.path)
            self.saved = self.path

    def on_train_end(self, trainer, pl_module) -> None:
        # Always: a kill during the final evaluation then resumes with no training step redone.
        self.restore_handlers()
        trainer.save_checkpoint(self.path)
        self.saved = self.path
        for callback in trainer.checkpoint_callbacks:
            # ModelCheckpoint(save_last) runs its own on_train_end after this one when it saved nothing periodic;
            # finding a last.ckpt it did not write, it would write last-v1.ckpt beside it. It is this file.
            if getattr(callback, "save_last", False) and callback.dirpath and \
                    Path(callback.dirpath).resolve() == self.path.parent.resolve():
                callback.last_model_path = os.path.join(callback.dirpath, self.path.name)  # as it names it

    def restore_handlers(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def interruption(self, trainer, run_dir: Path) -> RunInterrupted:
        """What to raise once fit returned on a signal: the message says where it stopped and how to resume."""
        signum = self.received or signal.SIGTERM
        where = f"at step {trainer.global_step}"
        if trainer.max_steps and trainer.max_steps > 0:
            where += f" of {trainer.max_steps}"
        saved = (f"checkpoint saved to {self.saved}" if self.saved
                 else "stopped at once, so the newest periodic checkpoint (if any) is where it resumes")
        return RunInterrupted(signum, f"interrupted by {signal_name(signum)} {where}; {saved}; resume with: "
                                      f"tunelab-train hydra.run.dir={run_dir} ckpt_path=auto")


def raise_on_signal(signum, frame) -> None:
    """Outside fit (model loading, evaluation, export): stop at once, as an interruption the CLI reports."""
    raise RunInterrupted(signum, f"interrupted by {signal_name(signum)} outside training")


def install_outside_fit_handlers() -> None:
    signal.signal(signal.SIGTERM, raise_on_signal)
