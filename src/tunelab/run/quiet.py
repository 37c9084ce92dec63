"""Library noise off for every entry point: one line per thing a user should read."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The on-policy module optimises manually and is checkpointed after its update, which is what a resume needs;
    # Lightning prints a code sample suggesting the state before it.
    warnings.filterwarnings("ignore", message="(?s)Using ModelCheckpoint with manual optimization.*")
    # conf/hydra/sweeper/basic.yaml replaces Hydra's basic sweeper by the ledger's (same schema, + _target_),
    # so that experiment and sweep configs can still pick another sweeper; Hydra warns about the shared name.
    warnings.filterwarnings("ignore", message="(?s).*hydra/sweeper/basic' is validated against ConfigStore schema.*")
    for name in ("transformers", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # lm-eval warns on every call that a model object (not a hub name) was passed, which is how tunelab uses it.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
