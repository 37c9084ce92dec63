"""The DDP pair: N ranks at batch B must see exactly the global batches of 1 process at N*B, and train alike."""

from __future__ import annotations

import random

import pytest
from omegaconf import OmegaConf

from tunelab.data.batching import StepBatchSampler
from tunelab.paths import CONF_DIR
from tunelab.verify.pairs import FAIL, PASS, Context, ddp, differing_global_batches


def context(tmp_path, **settings) -> Context:
    return Context([], OmegaConf.merge(OmegaConf.load(CONF_DIR / "verify.yaml"), {"tiny": True}, settings), tmp_path)


def old_megabatch_order(self):
    """The sampler before the fix: megabatches sized by the per-rank batch, not the global one."""
    indices = list(range(len(self.dataset)))
    random.Random(self.seed * 100_003 + self.epoch).shuffle(indices)
    size = self.batch_size * self.megabatch_factor
    lengths = self.dataset.lengths
    mega = [sorted(indices[i : i + size], key=lambda j: -lengths[j]) for i in range(0, len(indices), size)]
    return [j for chunk in mega for j in chunk]


def test_ranks_see_the_global_batches_of_one_process_and_not_with_per_rank_megabatches(tmp_path, tokenizer, monkeypatch):
    # The whole shipped training split (949 examples), length grouping on as by default.
    assert differing_global_batches(context(tmp_path), tokenizer, batch=2, devices=2) == 0.0
    monkeypatch.setattr(StepBatchSampler, "order", old_megabatch_order)
    assert differing_global_batches(context(tmp_path), tokenizer, batch=2, devices=2) > 0.5


@pytest.mark.slow
def test_ddp_pair_passes_and_fails_without_the_world_size_scaling(tmp_path, monkeypatch):
    ok = ddp(context(tmp_path / "ok"))
    assert ok.status == PASS, ok

    # Broken on purpose in every rank (the ranks are subprocesses, so through sitecustomize): the loss
    # forgets that DDP averages gradients over ranks, so each step trains at half the gradient.
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "from tunelab.methods.base import CausalLMModule\n"
        "step = CausalLMModule.training_step\n"
        "def training_step(self, batch, batch_idx):\n"
        "    return step(self, batch, batch_idx) / self.trainer.world_size\n"
        "CausalLMModule.training_step = training_step\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{patch}:{CONF_DIR.parent / 'src'}")
    broken = ddp(context(tmp_path / "broken"))
    assert broken.status == FAIL, broken
    assert broken.measured["grad_norm"] > 0.3  # half the gradient
