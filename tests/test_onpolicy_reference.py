"""The on-policy methods reproduce recorded, seeded training traces: per update, the loss and a few logged values of
method=ppo, grpo and rloo on the tiny model (fp32, CPU, one thread), against tests/fixtures/onpolicy_reference.json.

The traces were recorded before the on-policy family was rebuilt as one module (methods/rl/); this test holds the
rebuilt module to the same numbers. Regenerate only on purpose:
    .venv/bin/python -m tests.test_onpolicy_reference
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import make_cfg

FIXTURE = Path(__file__).parent / "fixtures" / "onpolicy_reference.json"
# Pinned: the CPU, fp32 and one thread (no `auto`), a schedule without warm-up, 3 rollouts of a tiny LoRA policy.
COMMON = ["trainer=cpu", "trainer.precision=32-true", "adapter=lora", "optimizer.lr=1e-2", "scheduler.name=cosine",
          "scheduler.warmup_ratio=0.0", "trainer.max_steps=-1", "trainer.max_epochs=1"]
METHODS = {
    # PPO: 2 epochs x 2 minibatches per rollout (the second epoch shuffles), KL (k1) in the reward, a value head
    "ppo": ["method=ppo", "data.max_train_examples=12", "data.batch_size=4", "method.module.max_completion_length=6",
            "method.module.num_iterations=2", "method.module.num_minibatches=2",
            "method.module.rewards.score._target_=tests.test_onpolicy_reference.vowel_reward"],
    # GRPO: groups of 4, KL (k3) in the loss, clip-higher, 2 iterations x 2 minibatches, the dapo normaliser
    "grpo": ["method=grpo", "data.max_train_examples=6", "data.batch_size=2", "method.module.num_generations=4",
             "method.module.max_completion_length=6", "method.module.beta=0.04", "method.module.epsilon_high=0.28",
             "method.module.num_iterations=2", "method.module.num_minibatches=2", "method.module.rewards.format=null",
             "method.module.reward_weights=null",
             "+method.module.rewards.vowels._target_=tests.test_onpolicy_reference.vowel_reward"],
    # RLOO: groups of 4, KL (k1) in the reward, the sequence-level ratio, 2 iterations
    "rloo": ["method=rloo", "data.max_train_examples=6", "data.batch_size=2", "method.module.num_generations=4",
             "method.module.max_completion_length=6", "method.module.num_iterations=2",
             "method.module.rewards.format=null", "method.module.reward_weights=null",
             "+method.module.rewards.vowels._target_=tests.test_onpolicy_reference.vowel_reward"],
}
# What is recorded per update beside the returned loss (the mean over the update's optimizer steps).
LOGGED = {
    "ppo": ["ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/reward", "ppo/explained_variance"],
    "grpo": ["grpo/reward", "grpo/reward_std", "grpo/kl", "grpo/entropy", "grpo/clip_ratio/region_mean",
             "grpo/completion_length"],
    "rloo": ["rloo/reward", "rloo/entropy", "rloo/completion_length"],
}
RTOL, ATOL = 1e-5, 1e-6  # summation order may differ by a rounding step; a changed sample or formula moves far more


def vowel_reward(prompts, responses, references):
    """A programmatic reward that varies between a tiny random model's responses: the share of vowels."""
    return [sum(c in "aeiou" for c in r.lower()) / max(len(r), 1) for r in responses]


class Recorder(pl.Callback):
    def __init__(self, keys: list[str]):
        self.keys, self.rows = keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.rows.append({"global_step": trainer.global_step, "loss": float(outputs["loss"]),
                          **{k: float(logged[k]) for k in self.keys if k in logged}})


def trace(method: str, run_dir: Path) -> list[dict]:
    """Per update of a seeded fit: the step count, the loss and the recorded logged values."""
    from tunelab.run.assemble import assemble, finalize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = finalize(make_cfg(run_dir, *COMMON, *METHODS[method]))
        parts = assemble(cfg)
        recorder = Recorder(LOGGED[method])
        trainer = pl.Trainer(accelerator="cpu", precision="32-true", max_epochs=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, callbacks=[recorder],
                             default_root_dir=str(run_dir))
        trainer.fit(parts.module, datamodule=parts.datamodule)
        return recorder.rows
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_recorded_per_update_losses_are_reproduced(tmp_path, method):
    expected = json.loads(FIXTURE.read_text())[method]
    got = trace(method, tmp_path)
    assert [row["global_step"] for row in got] == [row["global_step"] for row in expected]
    for step, (want, have) in enumerate(zip(expected, got)):
        assert set(want) == set(have), (step, sorted(set(want) ^ set(have)))
        for key, value in want.items():
            assert math.isclose(have[key], value, rel_tol=RTOL, abs_tol=ATOL), (method, step, key, have[key], value)


def record() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        traces = {method: trace(method, Path(tmp) / method) for method in METHODS}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(traces, indent=1) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    record()
