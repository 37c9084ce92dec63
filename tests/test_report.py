"""tunelab-report on hand-made run dirs: grouping, mean ± std over seeds, failed runs, confounds, errors."""

import csv
import json
import math
import statistics

import pytest
import yaml

from tunelab.cli.report import main as report_main
from tunelab.errors import TunelabError
from tunelab.report import build_report, compare, load_runs, plots


def fake_run(path, overrides, config, metrics=None, failed=None, losses=(2.0, 1.5, 1.0)):
    """A run dir as tunelab-train leaves it: .hydra/overrides.yaml, resolved_config.yaml, csv, metrics.json."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / "resolved_config.yaml").write_text(yaml.safe_dump(config | {"paths": {"run_dir": str(path)}}))
    (path / "csv").mkdir()
    rows = ["step,train/loss"] + [f"{i},{loss}" for i, loss in enumerate(losses)]
    (path / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    if failed:
        (path / "FAILED").write_text(failed + "\n")
    if metrics is not None:
        sections = {"tuned": {}, "train": {}}
        for key, value in metrics.items():
            section, _, name = key.partition("/")
            sections[section][name] = value
        (path / "metrics.json").write_text(json.dumps(sections | {"seed": config["seed"]}))
    return path


def config(adapter, seed, lr):
    return {"seed": seed, "data": {"split_seed": seed, "max_length": 96}, "adapter": {"name": adapter},
            "optimizer": {"lr": lr}, "run_name": f"sft-{adapter}-{seed}", "tags": [adapter]}


LOSS = {("full", 0): 1.0, ("full", 1): 1.2, ("full", 2): 1.4, ("lora", 0): 2.0, ("lora", 1): 2.5, ("lora", 2): 3.0}


@pytest.fixture
def study(tmp_path):
    """A 2 x 3 grid (adapter x seed) as a multirun leaves it, plus one failed and one incomplete job."""
    root = tmp_path / "multirun"
    for job, ((adapter, seed), loss) in enumerate(LOSS.items()):
        lr = 5e-5 if adapter == "full" else 1e-3   # changed by the adapter group itself: not a confound
        fake_run(root / str(job), [f"adapter={adapter}", f"seed={seed}"], config(adapter, seed, lr),
                 {"tuned/test/loss": loss, "train/fit_seconds": 10.0 + job, "train/peak_memory_mb": 500.0})
    fake_run(root / "6", ["adapter=lora", "seed=3"], config("lora", 3, 1e-3), failed="TunelabError: loss is NaN")
    fake_run(root / "7", ["adapter=full", "seed=3"], config("full", 3, 5e-5))
    return root


def test_groups_by_the_swept_override_and_averages_over_seeds(study, tmp_path):
    report = build_report([study], out=tmp_path / "report")
    assert report.comparison.group_keys == ["adapter"]           # seed and split_seed (= seed) are averaged over
    assert "data.split_seed" in report.comparison.seed_keys
    summary = report.summary.set_index("group")
    full, lora = summary.loc["adapter=full"], summary.loc["adapter=lora"]
    assert full["tuned/test/loss:mean"] == pytest.approx(1.2)
    assert full["tuned/test/loss:std"] == pytest.approx(statistics.stdev([1.0, 1.2, 1.4]))
    assert lora["tuned/test/loss:mean"] == pytest.approx(2.5)
    assert lora["tuned/test/loss:std"] == pytest.approx(0.5)
    assert (full["tuned/test/loss:n"], lora["tuned/test/loss:n"]) == (3, 3)
    assert not [w for w in report.comparison.warnings if w.startswith("confounded")]
    text = report.markdown_path.read_text()
    assert "1.2 ± 0.2 (n=3)" in text and "2.5 ± 0.5 (n=3)" in text
    for name in ("curves.png", "metrics.png", "cost.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in text


def test_failed_and_incomplete_runs_are_marked_not_dropped(study, tmp_path):
    report = build_report([study], out=tmp_path / "report")
    summary = report.summary.set_index("group")
    assert summary.loc["adapter=lora", ["runs", "finished", "failed"]].tolist() == [4, 3, 1]
    assert summary.loc["adapter=full", ["runs", "finished", "incomplete"]].tolist() == [4, 3, 1]
    statuses = dict(zip(report.runs.run, report.runs.status))
    assert statuses[str((study / "6").resolve())] == "failed"
    assert statuses[str((study / "7").resolve())] == "incomplete"
    assert math.isnan(report.runs.set_index("run").loc[str((study / "6").resolve()), "tuned/test/loss"])
    text = report.markdown_path.read_text()
    assert "| FAILED |" in text and "| INCOMPLETE |" in text and "loss is NaN" in text
    assert "(3/1/0)" in text and "(3/0/1)" in text   # ok/failed/incomplete per group


def test_a_value_that_differs_within_a_group_is_reported_as_confounded(tmp_path):
    for seed, max_length in ((0, 96), (1, 128)):  # same overrides, different config: not like with like
        cfg = config("lora", seed, 1e-3)
        cfg["data"]["max_length"] = max_length
        fake_run(tmp_path / "runs" / str(seed), [f"seed={seed}"], cfg, {"tuned/test/loss": 1.0})
    report = build_report([tmp_path / "runs"], out=tmp_path / "report")
    assert any("`data.max_length`" in w and "confounded" in w for w in report.comparison.warnings)
    assert "confounded" in report.markdown_path.read_text()


def test_runs_without_overrides_group_by_the_resolved_values_that_differ(tmp_path):
    for name, (adapter, lr) in {"a": ("full", 5e-5), "b": ("lora", 1e-3)}.items():
        path = fake_run(tmp_path / name, [], config(adapter, 0, lr), {"tuned/test/loss": 1.0})
        (path / ".hydra" / "overrides.yaml").unlink()
    report = build_report([tmp_path / "a", tmp_path / "b"], out=tmp_path / "report")
    assert report.comparison.group_keys == ["adapter.name", "optimizer.lr"]
    assert len(report.summary) == 2


def test_bad_input_is_one_clear_error(study, tmp_path, capsys):
    with pytest.raises(TunelabError, match="available: .*tuned/test/loss"):
        build_report([study], out=tmp_path / "r", metrics=["tuned/test/bleu"])
    only_failed = tmp_path / "only_failed"
    fake_run(only_failed / "0", ["seed=0"], config("lora", 0, 1e-3), failed="boom")
    with pytest.raises(TunelabError, match="no finished runs"):
        build_report([only_failed])
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path / "does_not_exist")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err


def test_cli_writes_the_report_and_prints_the_group_table(study, tmp_path, capsys):
    report_main([str(study), "--out", str(tmp_path / "out"), "--metric", "train/fit_seconds"])
    printed = capsys.readouterr()
    assert "adapter=full" in printed.out and "adapter=lora" in printed.out
    assert "failed:" in printed.err and "incomplete:" in printed.err
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "summary.csv").is_file()



def test_runs_on_different_test_splits_are_named_and_warned_about_in_one_line(study, tmp_path):
    # the hand-made grid held out its test split with split_seed = seed (0-3), as runs did before it was fixed
    report = build_report([study], out=tmp_path / "report")
    warnings = [w for w in report.comparison.warnings if "test splits" in w]
    assert warnings == ["different test splits: the runs held out their test examples with data.split_seed 0, 1, 2, 3, "
                        "so their differences mix data variance into what is compared; give every run one data.split_seed"]
    text = report.markdown_path.read_text()
    assert "Test split: `data.split_seed` = 0 (2 runs), 1 (2 runs), 2 (2 runs), 3 (2 runs) in all 8 runs: different test splits." in text
    assert f"- {warnings[0]}" in text and "confounded" not in text


def test_runs_on_one_test_split_say_which(tmp_path):
    for seed in (0, 1):
        cfg = config("lora", seed, 1e-3)
        cfg["data"]["split_seed"] = 42
        fake_run(tmp_path / "runs" / str(seed), [f"seed={seed}"], cfg, {"tuned/test/loss": 1.0})
    report = build_report([tmp_path / "runs"], out=tmp_path / "report")
    assert "Test split: `data.split_seed=42` in all 2 runs: one test split." in report.markdown_path.read_text()
    assert not [w for w in report.comparison.warnings if "test splits" in w]

# --- curves of real runs ------------------------------------------------------------------------------

# The tiny model on 16 training examples: 2 steps an epoch, 2 epochs, so validation (at each epoch's end)
# logs val/loss twice; evaluation cut to loss only on a few examples.
VALIDATED = ["trainer.max_steps=-1", "trainer.max_epochs=2", "data.max_train_examples=16", "eval.metrics=null",
             "eval.compare_base=false", "eval.max_examples=2"]


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    from tests.helpers import run_train

    run_dir = tmp_path_factory.mktemp("validated") / "run"
    run_train(run_dir, *VALIDATED)
    return run_dir


def panels(fig) -> dict[str, list]:
    """Each panel's title and the y values of every line drawn in it."""
    return {ax.get_title(): [list(line.get_ydata()) for line in ax.get_lines()] for ax in fig.axes}


def test_the_curves_plot_has_train_and_val_loss_of_a_run_that_validated(validated_run, tmp_path):
    drawn = panels(plots.curve_figure(compare(load_runs([validated_run]))))
    assert list(drawn) == ["train/loss", "val/loss"]
    (train,), (val,) = drawn["train/loss"], drawn["val/loss"]
    # 4 optimizer steps and 2 validations; the end-of-run summary row that repeats the last of each is left out
    assert len(train) == 4 and len(val) == 2 and all(map(math.isfinite, train + val))
    report = build_report([validated_run], out=tmp_path / "report")
    assert "Not drawn" not in report.markdown_path.read_text()


def test_a_curve_no_run_logged_gets_no_empty_panel_but_a_line_saying_why(study, tmp_path):
    # the hand-made runs log train/loss only, like runs that trainer.max_steps stopped before validating
    drawn = panels(plots.curve_figure(compare(load_runs([study]))))
    assert list(drawn) == ["train/loss"] and all(drawn["train/loss"])
    text = build_report([study], out=tmp_path / "report").markdown_path.read_text()
    assert "Not drawn, no run logged them: `val/loss`. Validation runs at the end of an epoch" in text
    assert "(curves.png)" in text


def test_metrics_csv_names_the_training_loss_train_loss_once(validated_run):
    with (validated_run / "csv" / "metrics.csv").open() as handle:
        header = next(csv.reader(handle))
    assert "train/loss" in header and "val/loss" in header
    assert [c for c in header if c.startswith(("train/train/", "train/val/"))] == []
