"""Reports from hand-made results: predictions.jsonl, report.md (deltas, error examples, escaping),
the review sheet, and the W&B table (offline)."""

from __future__ import annotations

import json

import pytest

from tunelab.eval import ErrorAnalysis, Evaluator, ExactMatch, Rouge
from tunelab.eval.result import EvalResult
from tunelab.eval.report import write_reports


def scored(predictions: list[str]) -> EvalResult:
    rows = [{"prompt": f"Capital of {c}?", "reference": f"The capital is {r}.", "prediction": p, "finished": True}
            for (c, r), p in zip([("France", "Paris"), ("Peru", "Lima")], predictions)]
    evaluator = Evaluator(metrics={"rouge": Rouge(), "exact_match": ExactMatch(),
                                   "error_analysis": ErrorAnalysis(categories=["empty", "too_long", "misspelled"])})
    return evaluator.score(rows, "test")


@pytest.fixture()
def results():
    return {"base": scored(["", "The capital | of Peru is Lima, a large city on the coast with many many people."]),
            "tuned": scored(["The capital is Paris.", "The capital is Lmia."])}


def test_report_has_metrics_deltas_errors_and_samples(tmp_path, results):
    sections = write_reports(tmp_path, results, Evaluator(), "unit report")
    report = (tmp_path / "report.md").read_text()
    base, tuned = results["base"].metrics, results["tuned"].metrics
    assert tuned["test/exact_match"] == 0.5 and base["test/exact_match"] == 0.0
    assert "| test/exact_match | 0.0000 | 0.5000 | +0.5000 ✓ |" in report
    assert "| test/errors/empty | 0.5000 | 0.0000 | -0.5000 ✓ |" in report  # fewer errors is better
    assert "| empty | 1 (50%) | 0 (0%) |" in report and "| misspelled | 0 (0%) | 1 (50%) |" in report
    assert "words: lmia" in report
    assert "The capital \\| of Peru" in report  # a pipe in an output does not break the table
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert records[0]["tuned"]["exact_match"] == 1.0 and records[0]["base"]["errors"] == ["empty"]
    assert sections["summaries"]["tuned"]["error_analysis"]["misspelled"]["count"] == 1
    assert (tmp_path / "review_sheet.csv").is_file() and (tmp_path / "review_key.json").is_file()


def test_eval_result_round_trips(tmp_path, results):
    results["tuned"].save(tmp_path / "r.json")
    loaded = EvalResult.load(tmp_path / "r.json")
    assert loaded == results["tuned"] and loaded.rows[1]["prediction"] == "The capital is Lmia."


def test_wandb_logger_gets_the_side_by_side_table(tmp_path, results, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="tunelab-test")
    write_reports(tmp_path, results, Evaluator(), "unit report", loggers=[logger])
    logger.experiment.finish()
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/predictions*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert "tuned/prediction" in table["columns"] and len(table["data"]) == 2
