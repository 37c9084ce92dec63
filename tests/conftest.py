"""Shared fixtures: offline everything, a composed config on the tiny model, a run helper."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.helpers import embedded_tokenizer  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs 2 workers): one torch thread per worker and per process a test
    starts, so the workers share the cores instead of oversubscribing them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (chat template; pad == eos == <|im_end|>)."""
    return embedded_tokenizer()


@pytest.fixture
def one_thread():
    """Many short CPU fits in a row: one thread each avoids oversubscribing a small shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same RNG state, so a result never depends on which tests ran before it."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
