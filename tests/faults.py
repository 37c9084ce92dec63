"""A callback that makes one trial of a sweep fail or die, chosen by environment variables, so a test can
run the same command twice (once with the fault, once without) and the ledger sees the same grid."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pytorch_lightning import Callback

from tunelab.errors import TunelabError


def job_number() -> int | None:
    from hydra.core.hydra_config import HydraConfig

    return int(HydraConfig.get().job.num) if HydraConfig.initialized() else None


class InjectFault(Callback):
    """TUNELAB_FAIL_JOB=N: job N fails (a TunelabError, as a bad input would); TUNELAB_KILL_JOB=N: job N's
    process is SIGKILLed after TUNELAB_KILL_STEP optimizer steps (nothing saved: a lost machine);
    TUNELAB_HOLD_JOB=N: job N, when it started fresh (not from a checkpoint), waits after TUNELAB_HOLD_STEP steps,
    with a file HELD in its run dir, for a test to do something to it (scancel, requeue), up to 5 minutes."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        job = str(job_number())
        if os.environ.get("TUNELAB_FAIL_JOB") == job:
            raise TunelabError("injected failure")
        if os.environ.get("TUNELAB_KILL_JOB") == job and trainer.global_step >= int(os.environ.get("TUNELAB_KILL_STEP", "4")):
            os.kill(os.getpid(), signal.SIGKILL)
        if (os.environ.get("TUNELAB_HOLD_JOB") == job and trainer.ckpt_path is None
                and trainer.global_step == int(os.environ.get("TUNELAB_HOLD_STEP", "3"))):
            (Path(trainer.default_root_dir) / "HELD").write_text(f"{os.getpid()}\n")
            for _ in range(1500):
                time.sleep(0.2)
