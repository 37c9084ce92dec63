"""tunelab-verify's pairs on the tiny model: each passes as built, and fails when its mechanism is broken."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tunelab.paths import CONF_DIR
from tunelab.verify.pairs import FAIL, PASS, SKIP, Context, accumulation, merge, packing, resume, seeded

# verify's own defaults: 16 examples at batch 2 x accumulation 2 are 4 steps an epoch, so the resume
# pair checkpoints at step 3 (mid-epoch) and resumes across the epoch boundary.
SMALL = {"tiny": True}


pytestmark = pytest.mark.usefixtures("one_thread")


def context(tmp_path, *overrides: str, **settings) -> Context:
    loaded = OmegaConf.merge(OmegaConf.load(CONF_DIR / "verify.yaml"), SMALL, settings)
    return Context(list(overrides), loaded, tmp_path)


def test_seeded_pair_passes_and_fails_without_the_seed(tmp_path, monkeypatch):
    import pytorch_lightning as pl

    ok = seeded(context(tmp_path / "ok"))
    assert ok.status == PASS, ok
    assert ok.measured == {"loss": 0.0, "grad_norm": 0.0}

    # Broken on purpose: the seed is never applied, so the LoRA initialisation differs between runs.
    monkeypatch.setattr(pl, "seed_everything", lambda *args, **kwargs: None)
    broken = seeded(context(tmp_path / "broken"))
    assert broken.status == FAIL, broken
    assert max(broken.measured.values()) > 0 and "differs by" in broken.note


def test_accumulation_pair_passes_and_fails_with_a_per_micro_batch_mean(tmp_path, monkeypatch):
    from tunelab.methods.base import CausalLMModule

    ok = accumulation(context(tmp_path / "ok"))
    assert ok.status == PASS, ok

    # Broken on purpose: each micro-batch's own mean, as most trainers do; micro-batches hold
    # different numbers of response tokens, so the step is no longer the batch of B*k.
    def mean_per_micro_batch(self, batch, batch_idx):
        loss_sum, tokens = self.loss_sum(batch)
        return loss_sum / tokens.clamp(min=1)

    monkeypatch.setattr(CausalLMModule, "training_step", mean_per_micro_batch)
    broken = accumulation(context(tmp_path / "broken"))
    assert broken.status == FAIL, broken
    assert broken.measured["loss"] > broken.tolerance["loss"]


def test_resume_pair_passes_and_fails_when_the_schedule_is_not_restored(tmp_path, monkeypatch):
    from tunelab.methods.base import LanguageModelModule

    ok = resume(context(tmp_path / "ok"))
    assert ok.status == PASS, ok

    # Broken on purpose: the checkpoint loses the scheduler state; the resumed run restarts warmup.
    keep_trainable = LanguageModelModule.on_save_checkpoint

    def drop_scheduler(self, checkpoint):
        keep_trainable(self, checkpoint)
        checkpoint["lr_schedulers"] = []

    monkeypatch.setattr(LanguageModelModule, "on_save_checkpoint", drop_scheduler)
    broken = resume(context(tmp_path / "broken"))
    assert broken.status == FAIL, broken
    assert broken.measured["lr"] > broken.tolerance["lr"] and broken.measured["loss"] > broken.tolerance["loss"]


@pytest.mark.slow  # the schedule test above keeps a broken-resume check in the default run
def test_resume_pair_fails_when_the_data_position_is_not_restored(tmp_path, monkeypatch):
    from tunelab.data.batching import ResumableDataLoader

    # Broken on purpose: the loader forgets where it was, so the resumed run sees the epoch's first batches again.
    monkeypatch.setattr(ResumableDataLoader, "load_state_dict", lambda self, state: None)
    broken = resume(context(tmp_path))
    assert broken.status == FAIL, broken


def test_merge_pair_passes_and_fails_when_the_merge_drops_the_adapter(tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    ok = merge(context(tmp_path / "ok"))
    assert ok.status == PASS, ok
    assert (tmp_path / "ok" / "merge" / "final" / "adapter_config.json").is_file()

    # Broken on purpose: "merging" that unloads the adapter without folding it into the weights.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    broken = merge(context(tmp_path / "broken"))
    assert broken.status == FAIL, broken
    assert broken.measured["logits"] > broken.tolerance["logits"]


def test_pairs_that_do_not_apply_are_skipped_with_the_reason(tmp_path):
    full = merge(context(tmp_path, "adapter=full"))
    assert full.status == SKIP and "nothing to merge" in full.note
    preference = packing(context(tmp_path, "method=dpo"))
    assert preference.status == SKIP and "packing is for sft/pretrain" in preference.note


@pytest.mark.parametrize("overrides", [("adapter=lora",), *[pytest.param(o, marks=pytest.mark.slow) for o in (
    ("adapter=full",), ("method=pretrain", "adapter=lora"), ("method=pretrain", "data=facts_corpus", "adapter=full"))]])
def test_packing_pair_passes_and_fails_when_documents_attend_to_each_other(tmp_path, monkeypatch, overrides):
    ok = packing(context(tmp_path / "ok", *overrides))
    assert ok.status == PASS, ok
    assert ok.measured["grad_norm"] < 1e-5 and ok.measured["token_loss"] < 1e-5 and "tokens" not in ok.measured

    # Broken on purpose: packed rows read with a plain mask, so a document attends to the ones before it in its row.
    from tunelab.core import losses

    plain = losses.model_inputs
    monkeypatch.setattr(losses, "model_inputs", lambda model, batch: plain(model, {**batch, "position_ids": None}))
    broken = packing(context(tmp_path / "broken", *overrides))
    assert broken.status == FAIL, broken
    assert broken.measured["token_loss"] > broken.tolerance["token_loss"]


# The default run keeps the methods whose assembly differs (a reshaped head, Trainer pins, the on-policy base,
# unpaired data); the others assemble like DPO and run under -m slow.
@pytest.mark.parametrize("method", ["reward", "ppo", "grpo", "kto", *[pytest.param(m, marks=pytest.mark.slow) for m in
                                                                       ("dpo", "contrastive", "orpo", "simpo", "rloo")]])
def test_verify_builds_every_method_as_training_does(tmp_path, method):
    """verify assembles a run the way tunelab-train does: the reward head, PPO's Trainer pins, ..."""
    result = seeded(context(tmp_path, f"method={method}"))
    assert result.status == PASS, result
