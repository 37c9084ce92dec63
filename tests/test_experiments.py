"""Every experiment config composes and trains for two steps on the tiny model, so no study rots."""

import math
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from tests.helpers import make_cfg, read_metrics, run_train
from tunelab.paths import CONF_DIR, REPO_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# Stages that start from earlier runs: config key -> the experiment whose run dir it takes.
PREREQUISITES = {"rlhf_ppo": {"rlhf.sft_run": "rlhf_sft", "rlhf.reward_run": "rlhf_reward"},
                 "distill_arithmetic": {"method.module.reference_model": "rlhf_sft"}}  # any SFT run: the teacher
# The study's own settings stay; only the size shrinks (debug=fast comes with make_cfg).
TWO_STEPS = ["trainer.max_steps=2", "trainer.max_epochs=1", "trainer.val_check_interval=null",
             "eval.max_examples=2", "data.test_size=8", "data.val_size=4"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Run an experiment for two steps once per module; later stages reuse its run dir."""
    done = {}

    def run(experiment: str):
        if experiment not in done:
            inputs = [f"{key}={run(stage)[0]}" for key, stage in PREREQUISITES.get(experiment, {}).items()]
            run_dir = tmp_path_factory.mktemp(experiment)
            flat = run_train(run_dir, f"experiment={experiment}", *inputs, *tiny_model(experiment), *TWO_STEPS)
            done[experiment] = (run_dir, flat)
        return done[experiment]

    return run


def tiny_model(experiment: str) -> list[str]:
    """An experiment that pins the embedded model gets the tiny one here, a tiny sentence-transformer for
    all-MiniLM-L6-v2 (one that starts from an earlier run's model keeps it: that run was tiny already)."""
    make_cfg(Path("unused"), f"experiment={experiment}")
    model = HydraConfig.get().runtime.choices.get("model")
    return [] if model == "run" else ["model=tiny_sentence_transformer" if model == "minilm" else "model=tiny_llama"]


def staged(experiments):
    return [pytest.param(e, marks=pytest.mark.slow) if e in PREREQUISITES else e for e in experiments]


@pytest.mark.parametrize("experiment", staged(EXPERIMENTS))
def test_experiment_trains_two_steps_on_the_tiny_model(experiment, finished):
    run_dir, flat = finished(experiment)
    metrics = read_metrics(run_dir)
    assert metrics["train"]["global_step"] >= 2   # PPO takes several optimizer steps per rollout
    assert metrics["study"] != "default", "an experiment names its study (output folder and W&B group)"
    assert any(math.isfinite(v) for k, v in flat.items() if k.startswith("tuned/"))


@pytest.mark.parametrize("experiment", sorted(PREREQUISITES))
def test_a_staged_experiment_composes_with_its_inputs(experiment, tmp_path):
    """The default-run stand-in for the slow chained run above."""
    inputs = [f"{key}={tmp_path / stage}" for key, stage in PREREQUISITES[experiment].items()]
    cfg = make_cfg(tmp_path, f"experiment={experiment}", *inputs)
    assert cfg.study != "default"


@pytest.mark.parametrize("study", ["full_vs_lora", "lora_rank_targets", "lr_optuna"])
def test_each_study_has_its_folder_with_question_and_command(study):
    readme = (REPO_DIR / "experiments" / study / "README.md").read_text()
    assert f"experiment={study}" in readme       # the exact command
    assert "## Question" in readme and "## Result" in readme


COMPARISON = sorted(p.stem for p in (CONF_DIR / "experiment" / "method_comparison").glob("*.yaml"))


def test_the_method_comparison_scores_every_method_on_one_task_and_evaluation():
    """experiments/method_comparison/: each entry is its method, on the same records, split and evaluation."""
    from omegaconf import OmegaConf

    methods = {"cispo": "grpo", "gspo": "grpo", "grpo_mb2": "grpo"}  # loss values of the grpo config
    assert COMPARISON == ["cispo", "distill", "dpo", "grpo", "grpo_mb2", "gspo", "ppo", "rloo", "sft"]
    seen = set()
    for name in COMPARISON:
        cfg = make_cfg(Path("unused"), f"experiment=method_comparison/{name}", fast=False)
        assert HydraConfig.get().runtime.choices["method"] == methods.get(name, name)
        evaluation = OmegaConf.to_container(cfg.eval, resolve=True)
        del evaluation["compare_base"]  # the base row is computed once, by the sft entry
        seen.add((cfg.data.source, cfg.data.split_seed, cfg.data.test_size, cfg.optimized_metric, str(evaluation)))
    assert len(seen) == 1, seen
