"""Whole runs of the on-policy module: trainer.max_steps is exact and a run leaves one last.ckpt; a collapsed run
says so (a warning, train/collapsed_at_step in metrics.json, the report), and stop_on_collapse ends it as failed
with the command that resumes it."""

from __future__ import annotations

import json
import logging

import pytest

from tests.helpers import read_metrics, run_train
from tunelab.errors import TunelabError

TINY = ["trainer.precision=32-true", "adapter=lora", "method.evaluator.max_examples=2",
        "method.evaluator.compare_base=false", "data.max_train_examples=8"]
GROUPS = [*TINY, "data.batch_size=2", "method.module.num_generations=2", "method.module.max_completion_length=4",
          "method.module.rewards.format=null", "method.module.reward_weights=null",
          "method.module.rewards.correct._target_=tests.test_onpolicy_runs.vowel_reward"]
RUNS = {
    # PPO's 4 epochs per rollout: 2 steps end inside the first rollout (debug=fast saves every 3 steps: none here)
    "ppo": ["method=ppo", *TINY, "data.batch_size=2", "method.module.max_completion_length=4",
            "method.module.rewards.score._target_=tests.test_onpolicy_runs.vowel_reward", "trainer.max_steps=2"],
    # 2 iterations x 2 minibatches per rollout: 5 steps end inside the second rollout
    "grpo": ["method=grpo", *GROUPS, "data.batch_size=4", "method.module.num_iterations=2",
             "method.module.num_minibatches=2", "trainer.max_steps=5"],
    "sft": ["method=sft", "trainer.max_steps=2", "eval.max_examples=2", "eval.compare_base=false"],
}


def vowel_reward(prompts, responses, references):
    return [sum(c in "aeiou" for c in r.lower()) / max(len(r), 1) for r in responses]


def same_reward(prompts, responses, references):
    """Every completion scores the same: no group has a learning signal (what a collapsed policy looks like)."""
    return [1.0] * len(responses)


@pytest.mark.parametrize("method", list(RUNS))
def test_max_steps_is_exact_and_one_last_checkpoint_is_left(tmp_path, method):
    run_dir = tmp_path / "run"
    run_train(run_dir, *RUNS[method])
    steps = int(next(o for o in RUNS[method] if o.startswith("trainer.max_steps=")).split("=")[1])
    assert read_metrics(run_dir)["train"]["global_step"] == steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps


def test_a_collapsed_run_warns_once_records_the_step_and_the_report_marks_it(tmp_path, caplog):
    from tunelab.report.compare import status_warnings
    from tunelab.report.runs import COLLAPSED, load_run

    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        run_train(run_dir, "method=grpo", *GROUPS, "method.module.rewards.correct._target_=tests.test_onpolicy_runs.same_reward",
                  "method.module.collapse_patience=2", "trainer.max_steps=4")
    warnings = [r.getMessage() for r in caplog.records if "collapsed at step" in r.getMessage()]
    assert len(warnings) == 1 and "every group's rewards were equal" in warnings[0], warnings
    metrics = read_metrics(run_dir)
    assert metrics["train"]["collapsed_at_step"] == 2  # the second update in a row with no signal
    run = load_run(run_dir)
    assert run.status == COLLAPSED
    assert any(w.startswith("collapsed: ") and "step 2" in w for w in status_warnings([run]))


def test_completions_below_the_length_floor_collapse_a_run_without_groups(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, *RUNS["ppo"][:-1], "trainer.max_steps=8", "method.module.collapse_patience=2",
              "method.module.collapse_min_length=100")  # every completion is shorter than 100 tokens
    assert read_metrics(run_dir)["train"]["collapsed_at_step"] == 8  # PPO: 4 steps per update, 2 updates
    runs_without = tmp_path / "healthy"
    run_train(runs_without, *RUNS["ppo"][:-1], "trainer.max_steps=8", "method.module.collapse_patience=2")
    assert "collapsed_at_step" not in read_metrics(runs_without)["train"]


def test_stop_on_collapse_fails_the_run_with_the_resume_command(tmp_path):
    from tunelab.cli.common import user_error

    run_dir = tmp_path / "run"
    with pytest.raises(TunelabError) as raised:
        run_train(run_dir, "method=grpo", *GROUPS, "method.module.rewards.correct._target_=tests.test_onpolicy_runs.same_reward",
                  "method.module.collapse_patience=2", "method.module.stop_on_collapse=true", "trainer.max_steps=6")
    message = str(user_error(raised.value) or raised.value)
    assert message.startswith("collapsed at step 2: every group's rewards were equal")
    assert f"resume with: tunelab-train hydra.run.dir={run_dir} ckpt_path=auto" in message
    assert not (run_dir / "metrics.json").exists()
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert json.loads(json.dumps(message))  # one line
    assert "\n" not in message
