"""Evaluation end to end on the tiny model: a training run with the few-shot baseline and generation
metrics during training, then `tunelab-evaluate`, `tunelab-chat` and `tunelab-review` on its run dir."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import make_cfg
from tunelab.errors import TunelabError

# Tiny model, 24 training examples (3 steps an epoch, 2 epochs), 4 test examples, 4 new tokens.
TRAIN = ["debug=fast", "trainer.enable_progress_bar=false", "data.max_train_examples=24", "trainer.max_epochs=2", "eval.max_examples=4",
         "eval.generation.max_new_tokens=4", "eval.few_shot.k=2", "eval.during_training.every_n_epochs=1",
         "eval.during_training.max_examples=2"]
SMALL_EVAL = ["eval.max_examples=4", "eval.generation.max_new_tokens=4"]


def compose_job(config: str, out_dir: Path, overrides: list[str]):
    """The job config the CLI would build, with Hydra's runtime set (for ${hydra:...} values)."""
    return make_cfg(out_dir, *overrides, fast=False, config=config)


def run_evaluate(out_dir: Path, *overrides: str) -> dict:
    from tunelab.cli.evaluate import evaluate_target

    return evaluate_target(compose_job("evaluate", out_dir, [*SMALL_EVAL, *overrides]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from tunelab.run.train import train

    folder = tmp_path_factory.mktemp("run")
    train(compose_job("train", folder, TRAIN))
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_report_predictions_and_few_shot_beside_base_and_tuned(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for section in ("base", "few_shot", "tuned"):
        assert {"test/rougeL", "test/semantic_similarity", "test/errors/empty"} <= set(metrics[section])
    assert "test/loss" in metrics["base"] and "test/loss" in metrics["tuned"]
    assert metrics["delta"]["test/rougeL"] == pytest.approx(metrics["tuned"]["test/rougeL"] - metrics["base"]["test/rougeL"])
    assert set(metrics["summaries"]["tuned"]["error_analysis"]) >= {"empty", "truncated", "misspelled"}
    records = read_jsonl(run_dir / "predictions.jsonl")
    assert len(records) == 4
    assert {"prompt", "reference", "base", "few_shot", "tuned"} <= set(records[0])
    assert {"prediction", "rougeL", "errors", "finished"} <= set(records[0]["tuned"])
    report = (run_dir / "report.md").read_text()
    for heading in ("## Metrics", "## Error analysis", "## Samples"):
        assert heading in report
    assert "| test/rougeL |" in report and "Δ tuned − base" in report and records[0]["prompt"][:20] in report
    # generations were streamed as they came, one file per model
    assert len(read_jsonl(run_dir / "generations" / "tuned.jsonl")) == 4


def test_generation_metrics_are_logged_during_training(run_dir):
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    logged = [r for r in rows if r.get("generation/val/rougeL")]
    assert len(logged) == 2  # every epoch, 2 epochs


def test_few_shot_prompts_hold_k_train_examples_as_earlier_turns(run_dir):
    from tunelab.data import DataModule
    from tunelab.eval import Evaluator
    from tunelab.models import build_tiny_llama

    _, tokenizer = build_tiny_llama()
    datamodule = DataModule(tokenizer, "tunelab:facts_instruct.jsonl", max_train_examples=24)
    datamodule.setup()
    evaluator = Evaluator(few_shot={"k": 2})
    shots = evaluator.few_shot_prefix(datamodule)
    test = datamodule.conversations("test")[:1]
    prompt = evaluator.prompt_texts(datamodule, test, shots)[0]
    assert prompt.count("<|im_start|>user") == 3 and shots[0].reference in prompt and shots[1].reference in prompt
    assert prompt.endswith(datamodule.formatter.generation_prompt(test[0].prompt)[-40:])
    with pytest.raises(TunelabError, match="few_shot.k"):
        Evaluator(few_shot={"k": 1000}).few_shot_prefix(datamodule)


def test_evaluate_on_a_run_dir_gives_the_same_report_as_training(run_dir, tmp_path):
    metrics = run_evaluate(tmp_path, f"target={run_dir}")
    trained = json.loads((run_dir / "metrics.json").read_text())
    # same model, same data split, greedy: the same numbers (loss in bf16 to a small tolerance)
    for key in ("test/rougeL", "test/errors/empty"):
        assert metrics["tuned"][key] == pytest.approx(trained["tuned"][key])
        assert metrics["base"][key] == pytest.approx(trained["base"][key])
    assert metrics["tuned"]["test/loss"] == pytest.approx(trained["tuned"]["test/loss"], rel=1e-2)
    assert (tmp_path / "report.md").is_file() and len(read_jsonl(tmp_path / "predictions.jsonl")) == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["target"] == str(run_dir)
    # tunelab-report compares training runs: an evaluation's output dir beside them is skipped with a line, not
    # grouped as a run keyed `target=...`
    from tunelab.report import load_runs

    assert [run.path for run in load_runs([run_dir, tmp_path])] == [run_dir.resolve()]
    with pytest.raises(TunelabError, match="1 tunelab-evaluate output dirs skipped"):
        load_runs([tmp_path])



# A run whose eval settings are not the eval group's defaults (64 examples generated, no few-shot).
OWN_EVAL = ["debug=fast", "trainer.enable_progress_bar=false", "trainer.max_steps=2", "eval.max_examples=3",
            "eval.few_shot.k=1", "eval.generation.max_new_tokens=4"]


@pytest.fixture(scope="module")
def run_with_own_eval(tmp_path_factory) -> Path:
    from tunelab.run.train import train

    folder = tmp_path_factory.mktemp("own_eval")
    train(compose_job("train", folder, OWN_EVAL))
    return folder


def test_evaluate_on_a_run_dir_uses_the_runs_own_eval_settings(run_with_own_eval, tmp_path):
    from tunelab.cli.evaluate import evaluate_target

    metrics = evaluate_target(compose_job("evaluate", tmp_path, [f"target={run_with_own_eval}"]))  # nothing else typed
    trained = json.loads((run_with_own_eval / "metrics.json").read_text())
    records = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(records) == len(read_jsonl(run_with_own_eval / "predictions.jsonl")) == 3
    assert "few_shot" in records[0] and "## Metrics" in (tmp_path / "report.md").read_text()
    for section in ("base", "few_shot", "tuned"):
        assert metrics[section] == pytest.approx(trained[section], rel=1e-6), section


def test_eval_overrides_on_the_evaluate_command_line_win_over_the_runs_own(run_with_own_eval, tmp_path):
    from tunelab.cli.evaluate import evaluate_target

    metrics = evaluate_target(compose_job("evaluate", tmp_path, [f"target={run_with_own_eval}", "eval.max_examples=2"]))
    assert len(read_jsonl(tmp_path / "predictions.jsonl")) == 2
    assert "few_shot" in metrics   # what was not overridden is still the run's
    used = OmegaConf.load(tmp_path / "resolved_config.yaml").eval
    assert (used.max_examples, used.few_shot.k, used.generation.max_new_tokens) == (2, 1, 4)


def test_an_eval_group_on_the_command_line_adds_to_the_runs_eval_settings(run_with_own_eval, tmp_path):
    from tunelab.cli.evaluate import eval_config

    cfg = compose_job("evaluate", tmp_path, [f"target={run_with_own_eval}", "eval=judge", "~eval.metrics.rouge"])
    used = eval_config(cfg, OmegaConf.load(run_with_own_eval / "resolved_config.yaml"))
    assert "judge" in used.metrics and "rouge" not in used.metrics and "exact_match" in used.metrics
    assert (used.max_examples, used.few_shot.k) == (3, 1)

def test_local_llm_judge_on_a_real_tiny_model_counts_its_unparseable_replies(run_dir):
    from tunelab.eval import LLMJudge

    # A tiny random model never answers "Score: N": each reply is counted, kept, and not scored.
    judge = LLMJudge(model=str(run_dir / "final"), max_new_tokens=6)
    means, per = judge(["Paris.", "Lima."], ["Paris.", "Lima."], prompts=["Capital of France?", "Capital of Peru?"])
    assert means["judge/unparseable"] + means["judge/failed"] == 2 and math.isnan(means["judge_score"])
    assert all(p["judge_score"] is None and p["judge_reason"] for p in per)


@pytest.mark.slow
def test_evaluate_any_model_with_the_llm_judge_counting_unparseable_replies(run_dir, tmp_path):
    # The tiny random model judges: its replies are never a 1-5 score, so all are counted, none scored.
    metrics = run_evaluate(tmp_path, "model=tiny_llama", "eval=judge", f"eval.metrics.judge.model={run_dir / 'final'}",
                           "eval.metrics.judge.max_new_tokens=8", "eval.metrics.semantic_similarity=null",
                           "eval.metrics.error_analysis.categories=[empty,truncated]")
    assert set(metrics) >= {"model", "split", "target"} and "base" not in metrics
    assert metrics["model"]["test/judge/unparseable"] + metrics["model"]["test/judge/failed"] == 4
    assert math.isnan(metrics["model"]["test/judge_score"])
    judged = read_jsonl(tmp_path / "predictions.jsonl")[0]["model"]
    assert judged["judge_status"] == "unparseable" and judged["judge_reason"]


def test_evaluate_refuses_a_bad_target(tmp_path):
    with pytest.raises(TunelabError, match="does not exist"):
        run_evaluate(tmp_path, f"target={tmp_path / 'missing'}")
    with pytest.raises(TunelabError, match="neither a run dir"):
        run_evaluate(tmp_path / "out", f"target={tmp_path}")


def test_blind_review_sheet_round_trip(run_dir, tmp_path, capsys):
    from tunelab.cli import review

    review.main(["export", str(run_dir), "--out", str(tmp_path)])
    key = json.loads((tmp_path / "review_key.json").read_text())
    with (tmp_path / "review_sheet.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and "base" not in ",".join(rows[0]) and "tuned" not in ",".join(rows[0])
    # scored before anyone filled it in: one line saying so, no NaN
    with pytest.raises(SystemExit) as refused:
        review.main(["score", str(tmp_path / "review_sheet.csv")])
    assert refused.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no row is judged yet (4 of 4 blank)" in line and "nan" not in line.lower()
    # reviewer: prefers tuned twice, base once, one tie
    answers = []
    for i, row in enumerate(rows):
        tuned_slot = "1" if key["order"][row["id"]]["1"] == "tuned" else "2"
        answers.append([tuned_slot, tuned_slot, {"1": "2", "2": "1"}[tuned_slot], "tie"][i])
        row["preference"] = answers[-1]
    with (tmp_path / "review_sheet.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    capsys.readouterr()
    review.main(["score", str(tmp_path / "review_sheet.csv"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert (result["wins"], result["losses"], result["ties"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx((2 + 0.5) / 4)
    rows[3]["preference"] = ""  # one row left unjudged: the sentence counts it
    with (tmp_path / "review_sheet.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    review.main(["score", str(tmp_path / "review_sheet.csv")])
    assert "win rate 66.7% over 3 judged (2 wins, 1 losses, 0 ties; 1 unjudged: 1 blank" in capsys.readouterr().out


def test_chat_through_stdin_with_reset_and_quit(run_dir):
    from tunelab.cli import chat

    out = io.StringIO()
    chat.main([str(run_dir), "--max-new-tokens", "3"], stdin=io.StringIO("Hello\n/reset\n/bogus\nWhat is 2+2?\n/quit\nignored\n"),
              stdout=out)
    text = out.getvalue()
    assert "(conversation reset)" in text and "unknown command /bogus" in text

    session = chat.load_session(chat.parse_args([str(run_dir / "final"), "--max-new-tokens", "3"]))
    assert chat.loop(session, io.StringIO("one\ntwo\n"), io.StringIO(), stream=False) == 2
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == []


def test_zero_vs_few_shot_of_any_model_is_headed_so_in_the_order_of_report_md(tmp_path, capsys):
    run_evaluate(tmp_path, "model=tiny_llama", "eval.few_shot.k=1", "eval.metrics.semantic_similarity=null",
                 "eval.metrics.error_analysis=null")
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if " metric " in line)
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")] == ["metric", "zero-shot", "few-shot", "change"]
    report = (tmp_path / "report.md").read_text().splitlines()
    assert next(line for line in report if line.startswith("| metric")) == \
        "| metric | model (zero-shot) | few-shot base | Δ few-shot base − model (zero-shot) |"


@pytest.mark.parametrize("method, headline", [("dpo", "test/accuracy"), ("reward", "test/accuracy"),
                                              ("contrastive", "test/accuracy_at_1"), ("ppo", "test/reward"),
                                              ("kto", "test/accuracy"), ("grpo", "test/correct"),
                                              # the same evaluators as dpo and grpo: under -m slow
                                              pytest.param("orpo", "test/accuracy", marks=pytest.mark.slow),
                                              pytest.param("simpo", "test/accuracy", marks=pytest.mark.slow),
                                              pytest.param("rloo", "test/correct", marks=pytest.mark.slow)])
def test_evaluate_on_a_run_of_any_method_reports_that_methods_own_metrics(tmp_path, method, headline):
    """One assembler: the run's own loader, data kind and evaluator, so re-evaluating gives its training's report."""
    from tunelab.run.train import train

    model = ["model=tiny_sentence_transformer"] if method == "contrastive" else []
    run = tmp_path / "run"
    run.mkdir()
    train(compose_job("train", run, ["debug=fast", f"method={method}", *model, "trainer.max_steps=2",
                                     "trainer.enable_progress_bar=false"]))
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = run_evaluate(tmp_path / "evaluate", f"target={run}")
    assert headline in evaluated["tuned"]
    assert evaluated["tuned"][headline] == pytest.approx(trained["tuned"][headline], rel=1e-5, abs=1e-6)
    assert "test/rougeL" not in evaluated["tuned"]  # not the generation evaluator of SFT
    # Every kind of example is fingerprinted like SFT data: the run's manifest hashes the data it read.
    data = json.loads((run / "provenance.json").read_text())["data"]
    assert {"records", "tokenizer", "preprocessing", "cache_key"} <= set(data)


def test_an_eval_group_chosen_on_the_command_line_replaces_the_runs_own_evaluator(tmp_path):
    """`tunelab-evaluate target=<a DPO run> eval=default`: generation metrics of its answers against the chosen
    ones (what experiments/preference reports beside DPO's preference accuracy)."""
    from tunelab.run.train import train

    run = tmp_path / "run"
    run.mkdir()
    train(compose_job("train", run, ["debug=fast", "method=dpo", "trainer.max_steps=2",
                                     "trainer.enable_progress_bar=false"]))
    # (without eval=: DPO's own evaluator, test_evaluate_on_a_run_of_any_method_reports_that_methods_own_metrics)
    text = run_evaluate(tmp_path / "text", f"target={run}", "eval=default", "eval.metrics.semantic_similarity=null",
                        "eval.metrics.error_analysis=null")
    assert "test/rougeL" in text["tuned"] and "test/accuracy" not in text["tuned"]


@pytest.mark.parametrize("method", ["reward", "contrastive"])
def test_chat_refuses_a_run_whose_model_writes_no_text_in_one_line(tmp_path, method, capsys):
    """A reward model scores text and an embedding model embeds it: chat says so, and which runs it talks to."""
    from omegaconf import OmegaConf

    from tests.helpers import make_cfg
    from tunelab.cli import chat

    OmegaConf.save(make_cfg(tmp_path, f"method={method}"), tmp_path / "resolved_config.yaml", resolve=True)
    (tmp_path / "final").mkdir()  # what the run exported; never loaded
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as refused:
        chat.main([str(tmp_path)], stdin=io.StringIO("Hello\n"), stdout=io.StringIO())
    assert refused.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"is a method={method} run" in line and "writes none" in line
    talks_to = line.split("talks to runs of ")[1]
    assert "sft" in talks_to and "grpo" in talks_to and "reward" not in talks_to and "contrastive" not in talks_to
