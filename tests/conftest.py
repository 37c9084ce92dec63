"""Shared fixtures: offline everything, a composed config on the tiny model, a run helper."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# What `auto` resolves to is pinned, so no test depends on the machine it runs on: the CPU (GPU paths are
# checked by benchmarks/gpu_check.sh on a GPU machine), and the CPU's bf16 probe as on a CPU where bf16 is
# slower than fp32 (auto = 32-true, the fastest choice on every CPU seen). Tests of the bf16 branch pin
# their own value with the `cpu_bf16` fixture; `TUNELAB_CPU_BF16_SPEEDUP=4 pytest ...` runs the suite as
# on a CPU where bf16 is 4x faster (auto = bf16-mixed), e.g. to check that a test does not depend on it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TUNELAB_CPU_BF16_SPEEDUP", "0.5")

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


@pytest.fixture
def cpu_bf16(monkeypatch):
    """cpu_bf16(speedup): the CPU's bf16 probe answers `speedup` (bf16 matmul speed / fp32's), in this process
    and the ones it starts; 4.0 makes `auto` bf16-mixed, 0.5 makes it 32-true, whatever this CPU is."""
    from tunelab.platform import hardware

    def pin(speedup: float) -> str:
        monkeypatch.setenv(hardware.SPEEDUP_ENV, str(speedup))
        hardware.auto_precision.cache_clear()
        return hardware.auto_precision("cpu").value

    yield pin
    hardware.auto_precision.cache_clear()


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same RNG state, so a result never depends on which tests ran before it."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
