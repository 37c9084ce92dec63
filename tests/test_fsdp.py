"""`trainer=fsdp` (FSDP2 over gloo) really shards over 2 CPU processes with the result of one process."""

import pytest
import torch

from tests.helpers import make_cfg, read_metrics, run_ddp, run_train
from tunelab.errors import TunelabError

SAME_RUN = ["trainer.max_steps=-1", "trainer.max_epochs=1", "trainer.precision=32-true", "optimizer.lr=1e-3",
            "trainer.limit_val_batches=null", "eval.metrics={}", "eval.compare_base=false", "scheduler.name=constant"]


def final_weights(run_dir):
    from safetensors.torch import load_file

    (weights,) = (run_dir / "final").glob("*.safetensors")
    return load_file(weights)


def assert_same_weights(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("adapter", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_two_fsdp_processes_at_the_same_global_batch_match_one_process(tmp_path, adapter):
    run = [f"adapter={adapter}", "trainer.limit_train_batches=4", *SAME_RUN]
    fsdp = run_ddp(tmp_path / "fsdp", "data.batch_size=4", *run, trainer="fsdp", timeout=600)
    single = run_train(tmp_path / "single", "data.batch_size=8", *run) and read_metrics(tmp_path / "single")
    assert fsdp["train"]["global_step"] == single["train"]["global_step"] == 4
    assert fsdp["tuned"]["test/loss"] == pytest.approx(single["tuned"]["test/loss"], rel=1e-4)
    assert fsdp["train"]["val/loss"] == pytest.approx(single["train"]["val/loss"], rel=1e-4)
    # each process held half of the weights: the tiny Llama's 2 blocks and the root, sharded in two
    log = (tmp_path / "fsdp" / "train.log").read_text()
    assert "fsdp: 2 blocks (LlamaDecoderLayer) and the root sharded over 2 processes" in log
    # final/ holds the full weights gathered from both shards: the one-process weights
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "single"))
    assert len(list((tmp_path / "fsdp").rglob("metrics.csv"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_fsdp_resume_ends_with_the_weights_of_a_straight_run(tmp_path, adapter):
    run = [f"adapter={adapter}", "data.batch_size=4", "callbacks.checkpoint.every_n_train_steps=2", *SAME_RUN]
    run_ddp(tmp_path / "straight", *run, "trainer.max_steps=4", trainer="fsdp", timeout=600)
    run_ddp(tmp_path / "resumed", *run, "trainer.max_steps=2", trainer="fsdp", timeout=600)
    resumed = run_ddp(tmp_path / "resumed", *run, "trainer.max_steps=4", "ckpt_path=auto", "overwrite=true",
                      trainer="fsdp", timeout=600)
    assert resumed["train"]["global_step"] == 4
    assert "Restored all states from the checkpoint" in (tmp_path / "resumed.out").read_text()  # the last call's output
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))


def test_gathered_weights_load_into_a_plain_copy_with_tied_embeddings_tied_again():
    from tunelab.models.tiny import build_tiny_llama
    from tunelab.platform.sharding import load_full_weights, meta_skeleton

    model, _ = build_tiny_llama()
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    state = {k: v + 1 for k, v in model.state_dict().items()}
    del state["lm_head.weight"]  # a state dict may name a tied weight once
    loaded = load_full_weights(skeleton, state)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight + 1)
    assert not any(p.is_meta for p in loaded.parameters())


@pytest.mark.parametrize("override, message", [
    ("method=ppo", "cannot run this method"),
    ("eval.during_training.every_n_epochs=1", "cannot generate during training"),
    ("method=dpo method.module.precompute_ref_logps=true adapter=full", "cannot precompute reference log-probs"),
])
def test_fsdp_refuses_what_it_cannot_shard_before_anything_slow(tmp_path, override, message):
    from tunelab.run.train import train

    cfg = make_cfg(tmp_path, "trainer=fsdp", *override.split())
    with pytest.raises(TunelabError, match=message):
        train(cfg)
    assert not (tmp_path / "base_eval.json").exists()

