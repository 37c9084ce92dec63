"""method=distill: on-policy distillation on the on-policy module (the student samples, a teacher scores every
token, the generalised JSD), with the teacher from a run dir, an HF folder or a model name; it trains, evaluates,
exports and passes tunelab-verify's seeded pair like every method."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import embedded_tokenizer, make_cfg, read_metrics, run_train

FAST = ["method=distill", "trainer.precision=32-true", "adapter=lora", "data.max_train_examples=8",
        "data.batch_size=2", "method.module.max_completion_length=6", "method.evaluator.max_examples=4"]


def one_line(err: BaseException) -> str:
    """What the command line prints for a failed run: the user error under Hydra's wrapper, on one line."""
    from tunelab.cli.common import user_error

    error = user_error(err)
    assert error is not None and "\n" not in str(error), err
    return str(error)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random Llama other than the student (another seed), saved as a run dir's final/ folder."""
    from tunelab.models import build_tiny_llama

    run_dir = tmp_path_factory.mktemp("teacher_run")
    model, tokenizer = build_tiny_llama(seed=1)
    model.save_pretrained(run_dir / "final")
    tokenizer.save_pretrained(run_dir / "final")
    return run_dir


def test_the_teacher_comes_from_a_run_dir_an_hf_folder_or_a_model_name(teacher):
    from tunelab.methods.rl.rollout import load_reference

    from_run, from_folder = load_reference(str(teacher)), load_reference(str(teacher / "final"))
    for loaded in (from_run, from_folder):
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(from_run.get_output_embeddings().weight, from_folder.get_output_embeddings().weight)
    embedded = load_reference("embedded:smollm2-135m-instruct")
    assert embedded.config.hidden_size == 576 and not any(p.requires_grad for p in embedded.parameters())


def test_a_teacher_with_another_vocabulary_is_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    other.save_pretrained(tmp_path / "other")
    embedded_tokenizer().save_pretrained(tmp_path / "other")
    with pytest.raises(Exception) as raised:
        run_train(tmp_path / "run", *FAST, f"method.module.reference_model={tmp_path / 'other'}")
    assert "vocabulary of 100 tokens, the policy 49152" in one_line(raised.value)


def divergence(module, query, query_mask, response, mask) -> float:
    """The distillation loss of the policy now on fixed sampled completions."""
    from tunelab.methods.rl.losses import LossInputs, policy_objective

    with torch.no_grad():
        fwd = module.policy_forward(query, query_mask, response, mask, with_values=False)
        teacher = module.reference_forward(query, query_mask, response, mask)[1]
        x = LossInputs(fwd.logprobs, fwd.logprobs, None, mask.float(), fwd.logits, lambda: teacher)
        return float(policy_objective(x, None, module.o)[0])


def test_training_moves_the_student_towards_the_teacher(tmp_path, teacher):
    from tunelab.core.tensors import to_left_padding
    from tunelab.run.assemble import build_datamodule, build_module, load_model

    cfg = make_cfg(tmp_path, *FAST, f"method.module.reference_model={teacher}", "adapter=full", "optimizer.lr=1e-3",
                   "data.max_train_examples=16", "trainer.max_steps=-1", "trainer.max_epochs=2")
    pl.seed_everything(0)
    model, tokenizer = load_model(cfg)
    dm, module = build_datamodule(cfg, tokenizer), build_module(cfg, model, tokenizer)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    module.trainer, trainer.datamodule = trainer, dm
    trainer.strategy.connect(module)
    batch = dm.collator([dm.datasets["train"][i] for i in range(4)])
    query, query_mask = to_left_padding(batch["input_ids"], batch["attention_mask"], tokenizer.pad_token_id)
    response, mask, _, _ = module.generate(query, query_mask)
    before = divergence(module, query, query_mask, response, mask)
    trainer.fit(module, datamodule=dm)
    after = divergence(module, query, query_mask, response, mask)
    assert before > 0 and after < 0.7 * before, (before, after)


def test_a_run_trains_evaluates_and_exports_and_a_fresh_adapter_starts_at_zero_divergence(tmp_path):
    """No teacher given: the adapter-disabled student is the teacher, so the first loss is exactly 0."""
    run_dir = tmp_path / "run"
    run_train(run_dir, *FAST, "method.module.reference_model=null", "trainer.max_steps=2")
    metrics = read_metrics(run_dir)
    assert {"test/reward", "test/correct", "test/format"} <= set(metrics["tuned"]) <= set(metrics["base"])
    assert metrics["train"]["global_step"] == 2 and metrics["train"]["generated_tokens"] > 0
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("distill/loss")]
    assert float(rows[0]["distill/loss"]) == 0.0 and "distill/monitor_correct" in rows[0]
    assert "distill/reward" not in rows[0]  # no reward is trained on
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None


def test_verify_seeded_pair_passes_for_distill(tmp_path, teacher, one_thread):
    from omegaconf import OmegaConf

    from tunelab.paths import CONF_DIR
    from tunelab.verify.pairs import PASS, Context, seeded

    settings = OmegaConf.merge(OmegaConf.load(CONF_DIR / "verify.yaml"), {"tiny": True})
    result = seeded(Context(["method=distill", f"method.module.reference_model={teacher}",
                             "method.module.max_completion_length=6"], settings, tmp_path))
    assert result.status == PASS, result


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_beta_outside_0_1_is_one_line(tmp_path, beta):
    with pytest.raises(Exception) as raised:
        run_train(tmp_path / "run", *FAST, f"method.module.beta={beta}", "method.module.reference_model=null")
    assert f"beta={beta}: for loss_type=jsd it interpolates" in one_line(raised.value)
