"""Sweeps: multirun labels and isolation (the Hydra + Lightning DDP traps), the Optuna sweeper on the
tiny model with a diverged trial, run-dir naming, and the W&B sweep file."""

import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

from tests.helpers import make_cfg
from tunelab.errors import TunelabError
from tunelab.paths import CONF_DIR, REPO_DIR
from tunelab.report import build_report
from tunelab.study import ledger
from tunelab.study.multirun import child_argv, job_label, optimized_value, swept_keys, sweep_job

# The cheapest real job: tiny model, one step, loss-only evaluation on a few examples.
QUICK = ["debug=fast", "trainer.enable_progress_bar=false", "trainer.max_steps=1", "eval.metrics=null",
         "eval.compare_base=false", "data.test_size=8", "data.val_size=4"]


# QUICK with 4 steps and a validation every 2: something for a pruner to compare
QUICK_VALIDATED = [*(a for a in QUICK if not a.startswith("trainer.max_steps")), "trainer.max_steps=4"]


def tunelab_train(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tunelab.cli.train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def only_sweep_dir(root: Path) -> Path:
    sweeps = list(root.glob("outputs/*/multirun/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


# --- multirun jobs: labels, and what DDP children are told -----------------------------------------

def test_swept_keys_come_from_the_command_line_and_the_sweeper_params():
    argv = ["-m", "adapter=full,lora", "seed=0,1,2", "debug=fast", "+sweep=lr_optuna", "optimizer.lr=range(1,3)"]
    keys = swept_keys(argv, {"scheduler.warmup_ratio": "interval(0, 0.2)"})
    assert keys == ["adapter", "seed", "optimizer.lr", "scheduler.warmup_ratio"]
    assert job_label(["adapter=lora", "debug=fast", "seed=2", "+sweep=lr_optuna"], keys) == ["adapter=lora", "seed=2"]


@pytest.fixture
def multirun_job(tmp_path, monkeypatch):
    """A job of `tunelab-train -m adapter=full,lora seed=0,1 debug=fast` as Hydra hands it over."""
    cfg = make_cfg(tmp_path, "logger=wandb", "adapter=lora", "seed=1")
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg):
        hydra_cfg.mode = RunMode.MULTIRUN
        hydra_cfg.overrides.task = ["adapter=lora", "seed=1", "debug=fast"]
        hydra_cfg.runtime.output_dir = str(tmp_path)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/tunelab-train", "-m", "adapter=full,lora", "seed=0,1", "debug=fast"])
    return cfg


def test_a_multirun_job_is_labelled_by_its_swept_values(multirun_job):
    with sweep_job(multirun_job):
        resolved = OmegaConf.to_container(multirun_job.logger.wandb, resolve=True)
    assert resolved["tags"] == ["adapter=lora", "seed=1"]
    assert resolved["name"] == "sft-lora-tiny_llama-adapter=lora-seed=1"
    assert resolved["group"] == multirun_job.study


def test_ddp_children_of_a_multirun_job_rerun_that_job_only(multirun_job, tmp_path):
    from lightning_fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd

    with sweep_job(multirun_job):
        command, _ = _hydra_subprocess_cmd(local_rank=1)   # what Lightning starts rank 1 with
    job_args = command[-6:]          # after `python -m <module>` or `python <script>`
    assert job_args[:3] == ["adapter=lora", "seed=1", "debug=fast"]
    assert "adapter=full,lora" not in command and "-m" not in job_args
    assert f'hydra.run.dir="{tmp_path}"' in command        # this job's own dir: no duplicate output dirs
    assert sys.argv[1:] == ["-m", "adapter=full,lora", "seed=0,1", "debug=fast"]  # restored afterwards
    assert child_argv(["app", "-m", "--config-dir", "/c", "-cn=x", "a=1,2"], ["a=1"]) == ["app", "--config-dir", "/c", "a=1"]


def test_a_multirun_job_leaves_no_ddp_state_for_the_next_one(multirun_job, monkeypatch):
    """Lightning's launcher leaves LOCAL_RANK & co. and an open process group; the next DDP job would
    then think its ranks are started externally and wait for them forever."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with sweep_job(multirun_job):
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
        dist.init_process_group("gloo", rank=0, world_size=1)
    assert not dist.is_initialized()
    assert "LOCAL_RANK" not in os.environ and "MASTER_PORT" not in os.environ


def test_a_sweep_metric_the_run_does_not_return_is_a_clear_error():
    metrics = {"tuned/test/loss": 1.5, "tuned/test/rougeL": 0.4}
    with pytest.raises(TunelabError, match=r"optimized_metric=tuned/test/bleu .*tuned/test/loss, tuned/test/rougeL"):
        optimized_value(metrics, "tuned/test/bleu", strict=True)
    assert optimized_value(metrics, "tuned/test/bleu", strict=False) is None   # a single run only warns
    assert math.isnan(optimized_value({"tuned/test/loss": float("inf")}, "tuned/test/loss", strict=True))
    assert optimized_value({}, "tuned/test/loss", strict=True) is None         # ranks > 0 return nothing


def test_run_and_sweep_dirs_carry_microseconds_so_same_second_starts_do_not_collide(tmp_path):
    cfg = make_cfg(tmp_path)
    hydra_cfg = HydraConfig.get()
    for template in (hydra_cfg.run.dir, hydra_cfg.sweep.dir):
        assert re.search(r"_\d{2}-\d{2}-\d{2}-\d{6}$", template), template
    assert OmegaConf.to_container(hydra_cfg.sweep)["subdir"] == "${hydra.job.num}"   # one numbered dir per job
    assert cfg.study in hydra_cfg.run.dir


# --- the Optuna sweeper ------------------------------------------------------------------------------

def test_no_optuna_2_or_sqlalchemy_1_pin_is_left_and_optuna_5_is_installed():
    import optuna
    import sqlalchemy
    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {Requirement(r).name: Requirement(r).specifier for r in extras["sweeps"] + extras["dev"]}
    assert "hydra-optuna-sweeper" not in pins                 # capped optuna < 3
    assert not pins["optuna"].contains("2.10.1") and pins["optuna"].contains(optuna.__version__)
    assert not pins["sqlalchemy"].contains("1.4.54") and pins["sqlalchemy"].contains(sqlalchemy.__version__)
    assert int(optuna.__version__.split(".")[0]) >= 5


def test_the_override_grammar_becomes_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.tunelab_sweeper.search_space import grid_of, search_space

    space, fixed = search_space(["optimizer.lr=tag(log, interval(1e-5, 1e-2))", "adapter.r=choice(4, 8)",
                                 "trainer.max_steps=range(10, 41, 10)", "scheduler.warmup_ratio=interval(0.0, 0.2)",
                                 "debug=fast", "seed=3"])
    assert space == {"optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True), "adapter.r": CategoricalDistribution([4, 8]),
                     "trainer.max_steps": IntDistribution(10, 40, step=10),
                     "scheduler.warmup_ratio": FloatDistribution(0.0, 0.2)}
    assert fixed == {"debug": "fast", "seed": "3"}
    assert search_space(["seed=range(1,4)"])[0]["seed"] == IntDistribution(1, 3)   # Hydra's range: stop excluded
    grid = grid_of({k: space[k] for k in ("adapter.r", "trainer.max_steps")})
    assert grid == {"adapter.r": [4, 8], "trainer.max_steps": [10, 20, 30, 40]}
    with pytest.raises(TunelabError, match="sampler=grid needs a list for optimizer.lr"):
        grid_of(space)


def test_failed_diverged_and_missing_returns_have_no_values():
    from hydra_plugins.tunelab_sweeper.optuna_sweeper import values_of

    def ret(value, status=JobStatus.COMPLETED):
        return JobReturn(status=status, _return_value=value)

    assert values_of(ret(0.5), 1) == [0.5] and values_of(ret([0.5, 3]), 2) == [0.5, 3.0]
    for bad in (math.nan, math.inf, None, "x", [0.5, math.nan]):
        assert values_of(ret(bad), 1 if not isinstance(bad, list) else 2) is None, bad
    assert values_of(ret(0.5), 2) is None                              # one value for two objectives
    assert values_of(ret(RuntimeError("boom"), JobStatus.FAILED), 1) is None


def sweeper(sampler: dict, direction="minimize", **options):
    from hydra_plugins.tunelab_sweeper.optuna_sweeper import OptunaSweeper

    return OptunaSweeper(sampler=OmegaConf.create(sampler), direction=direction, storage=None, study_name="t",
                         n_trials=options.pop("n_trials", 4), n_jobs=1, max_failure_rate=1.0, params=None, **options)


def test_a_grid_whose_last_trial_fails_ends_cleanly(tmp_path):
    """GridSampler stops the study once its grid is used up, which raises outside `optimize()`."""
    from optuna.distributions import CategoricalDistribution

    search = sweeper({"_target_": "optuna.samplers.GridSampler", "seed": 0})
    space = {"lr": CategoricalDistribution([1.0, 2.0])}
    study = search.create_study(space)
    assert search.n_trials == 2                                        # capped at the grid's size
    first, second = (search.ask(study, space)[0] for _ in range(2))
    assert search.tell(study, first.number, JobReturn(status=JobStatus.COMPLETED, _return_value=0.5)) is True
    assert search.tell(study, second.number, JobReturn(status=JobStatus.COMPLETED, _return_value=math.nan)) is False
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert search.ask(study, space) == []                              # nothing missing: the search is done


def test_objectives_and_directions_that_do_not_match_and_pruning_several_objectives_are_one_line_errors():
    from hydra_plugins.tunelab_sweeper.optuna_sweeper import check_objectives

    check_objectives(["tuned/test/loss", "train/tokens_processed"], ["minimize", "minimize"])
    with pytest.raises(TunelabError, match=r"optimized_metric names 1 metric.*direction 2: give one direction per metric"):
        check_objectives("tuned/test/loss", ["minimize", "minimize"])
    several = sweeper({"_target_": "optuna.samplers.NSGAIISampler"}, direction=["minimize", "minimize"],
                      pruner=OmegaConf.create({"_target_": "optuna.pruners.MedianPruner"}))
    with pytest.raises(TunelabError, match="Optuna cannot prune a search with several objectives"):
        several.create_study({})


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "hydra" / "sweeper" / "sampler").glob("*.yaml")))
def test_every_sampler_by_name_proposes_values_in_the_search_space(name):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["+sweep=lr_optuna", f"hydra/sweeper/sampler={name}"], return_hydra_config=True)
    several = name == "nsga2"
    search = sweeper(cfg.hydra.sweeper.sampler, direction=["minimize", "minimize"] if several else "minimize", n_trials=6)
    space = {"lr": CategoricalDistribution([1e-3, 3e-3, 1e-2])} if name == "grid" else {"lr": FloatDistribution(1e-5, 1e-2, log=True)}
    study = search.create_study(space)
    for _ in range(search.n_trials):
        (trial,) = search.ask(study, space)
        lr = trial.params["lr"]
        assert 1e-5 <= lr <= 1e-2
        values = [math.log(lr) ** 2, lr] if several else math.log(lr) ** 2
        search.tell(study, trial.number, JobReturn(status=JobStatus.COMPLETED, _return_value=values))
    assert type(study.sampler).__name__ == cfg.hydra.sweeper.sampler._target_.rsplit(".", 1)[-1]
    assert len(study.trials) == search.n_trials and all(t.state.name == "COMPLETE" for t in study.trials)


def test_optuna_sweep_of_three_trials_fails_the_diverged_one_and_returns_the_best(tmp_path):
    """lr=inf turns every weight into NaN: the trial must be FAIL in Optuna, not the best score."""
    tunelab_train(tmp_path, "-m", "+sweep=lr_optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null",
                  "optimizer.lr=choice(1e-3,inf,3e-3)", "study=lr_test", *QUICK)
    sweep = only_sweep_dir(tmp_path)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_params"]["optimizer.lr"] in (1e-3, 3e-3)
    assert math.isfinite(result["best_value"])
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 3
    lrs = {yaml.safe_load((j / "resolved_config.yaml").read_text())["optimizer"]["lr"]: j for j in jobs}
    best_job = lrs[result["best_params"]["optimizer.lr"]]
    assert yaml.safe_load((best_job / "resolved_config.yaml").read_text())["tags"] == [
        f"optimizer.lr={result['best_params']['optimizer.lr']}"]

    report = build_report([sweep], out=tmp_path / "report")
    statuses = dict(zip(report.runs.group, report.runs.status))
    assert statuses == {"optimizer.lr=0.001": "finished", "optimizer.lr=inf": "diverged", "optimizer.lr=0.003": "finished"}
    assert any(w.startswith("diverged:") for w in report.comparison.warnings)



def test_a_trial_worse_than_the_median_at_a_validation_is_pruned_and_marked(tmp_path):
    """lr=10 is worse than the two finished trials at step 2: the median pruner stops it there (grid order, seed 0:
    2e-3, 1e-3, then 10)."""
    tunelab_train(tmp_path, "-m", "+sweep=lr_pruned", "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null",
                  "optimizer.lr=choice(10.0,1e-3,2e-3)", "trainer.val_check_interval=2", "study=prune",
                  *QUICK_VALIDATED)
    sweep = only_sweep_dir(tmp_path)
    statuses = {yaml.safe_load((sweep / n / "resolved_config.yaml").read_text())["optimizer"]["lr"]: row.status
                for n, row in ((str(n), row) for n, row in ledger.read(sweep).items())}
    assert statuses == {2e-3: "finished", 1e-3: "finished", 10.0: "pruned"}
    (pruned,) = [p for p in sweep.iterdir() if (p / "PRUNED").is_file()]
    assert (pruned / "PRUNED").read_text().startswith("step 2: val/loss=")
    import torch

    assert torch.load(pruned / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2   # stopped there
    import optuna

    trials = optuna.load_study(study_name="prune", storage=f"sqlite:///{sweep}/optuna.db").trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert all(sorted(t.intermediate_values) == ([2] if t.state.name == "PRUNED" else [2, 4]) for t in trials)

    report = build_report([sweep], out=tmp_path / "report")
    assert dict(zip(report.runs.group, report.runs.status))["optimizer.lr=10.0"] == "pruned"
    assert "| PRUNED |" in report.markdown_path.read_text()
    assert any(w.startswith("pruned:") and "step 2" in w for w in report.comparison.warnings)


def test_the_report_lists_the_pareto_front_of_a_two_objective_search(tmp_path):
    """Four trials of loss vs tokens, as a two-objective sweep leaves them: (1.0, 400) and (2.0, 100) and (1.5, 200)
    are each best somewhere; (2.5, 300) is beaten on both by (1.5, 200). The same check on real trials: the slow test
    below."""
    from tests.test_report import config, fake_run

    points = {0: (1.0, 400), 1: (2.0, 100), 2: (1.5, 200), 3: (2.5, 300)}
    for n, (loss, tokens) in points.items():
        run = fake_run(tmp_path / "sweep" / str(n), [f"optimizer.lr={n}e-3"],
                       config("lora", 0, n * 1e-3) | {"optimized_metric": ["tuned/test/loss", "train/tokens_processed"]},
                       {"tuned/test/loss": loss, "train/tokens_processed": tokens})
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"direction": ["minimize", "minimize"]}}}))
    text = build_report([tmp_path / "sweep"], out=tmp_path / "report").markdown_path.read_text()
    section = text[text.index("## Pareto front"):]
    assert "3 of the finished runs are not beaten on every objective at once" in section
    on_front = [n for n in points if f"`{(tmp_path / 'sweep' / str(n)).resolve()}`" in section]
    assert on_front == [0, 1, 2]
    assert section.index("| optimizer.lr=0e-3 |") < section.index("| optimizer.lr=2e-3 |") < section.index("| optimizer.lr=1e-3 |")


@pytest.mark.slow   # ~1 min; the report's part runs in the default suite above
def test_a_two_objective_search_records_its_pareto_front_and_the_report_lists_it(tmp_path):
    tunelab_train(tmp_path, "-m", "+sweep=quality_vs_cost", "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null",
                  "trainer.max_steps=choice(1,2,4)", "optimizer.lr=1e-2", "study=pareto", *QUICK[:2], *QUICK[3:])
    sweep = only_sweep_dir(tmp_path)
    rows = ledger.read(sweep)
    assert {r.metric for r in rows.values()} == {"tuned/test/loss,train/tokens_processed"}
    points = {n: tuple(map(float, r.value.split(","))) for n, r in rows.items()}
    assert len(points) == 3 and len({p[1] for p in points.values()}) == 3     # tokens grow with the steps
    # by hand: a point is on the front unless another is at least as good on both and better on one
    front = {n for n, p in points.items()
             if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points.values())}
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["directions"] == ["minimize", "minimize"]
    assert {t["number"] for t in result["best_trials"]} == front
    report = build_report([sweep], out=tmp_path / "report")
    text = report.markdown_path.read_text()
    section = text[text.index("## Pareto front"):]
    assert f"{len(front)} of the finished runs are not beaten" in section
    assert {n for n in rows if f"`{(sweep / str(n)).resolve()}`" in section} == front


# One generated token per test example, exact match only: predictions.jsonl lists the whole test split.
WHOLE_TEST_SPLIT = [*(a for a in QUICK if not a.startswith("eval.metrics")), "eval.max_examples=null",
                    "eval.generation.max_new_tokens=1", "eval.metrics.rouge=null",
                    "eval.metrics.semantic_similarity=null", "eval.metrics.error_analysis=null"]


def held_out_examples(job: Path) -> list[tuple[str, str]]:
    rows = map(json.loads, (job / "predictions.jsonl").read_text().splitlines())
    return [(row["prompt"], row["reference"]) for row in rows]


def test_a_seed_sweep_evaluates_every_seed_on_one_test_split(tmp_path):
    tunelab_train(tmp_path, "-m", "seed=0,1", "study=seeds", *WHOLE_TEST_SPLIT)
    sweep = only_sweep_dir(tmp_path)
    assert [yaml.safe_load((sweep / job / "resolved_config.yaml").read_text())["seed"] for job in "01"] == [0, 1]
    first, second = held_out_examples(sweep / "0"), held_out_examples(sweep / "1")
    assert len(first) == 8 and first == second    # data.test_size=8: every test example, the same in both
    report = build_report([sweep], out=tmp_path / "report")
    assert "Test split: `data.split_seed=42` in all 2 runs: one test split." in report.markdown_path.read_text()
    assert not [w for w in report.comparison.warnings if "test splits" in w]


def peak_rss_resettable() -> bool:
    """Whether this process may reset Linux's peak RSS (VmHWM), which per-job peaks in one process need."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# Job 0 fully fine-tunes a 16x wider tiny Llama: ~57 M parameters, ~0.9 GB more in weights, gradients and
# Adam moments than job 1's ~3 M; what the allocator keeps between jobs is far less than this gap.
MIN_PEAK_GAP_MB = 200


@pytest.mark.skipif(not peak_rss_resettable(), reason="/proc/self/clear_refs is not writable here, so a job's peak "
                    "RSS cannot be told from the process's (VmHWM only grows)")
def test_each_job_of_a_multirun_in_one_process_reports_its_own_peak_memory(tmp_path):
    tunelab_train(tmp_path, "-m", "model.hidden_size=1024,64", "adapter=full", "study=memory", *QUICK)
    sweep = only_sweep_dir(tmp_path)
    big, small = (json.loads((sweep / job / "metrics.json").read_text())["train"]["peak_memory_mb"] for job in "01")
    assert small < big - MIN_PEAK_GAP_MB, (big, small)   # before: the process's peak so far, so small >= big

# --- grids (slow: several processes) ------------------------------------------------------------------

@pytest.mark.slow
def test_a_2x2_grid_gives_four_run_dirs_and_a_report_with_two_groups(tmp_path):
    tunelab_train(tmp_path, "-m", "adapter=full,lora", "seed=0,1", "study=grid", *QUICK)
    sweep = only_sweep_dir(tmp_path)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    report = build_report([sweep], out=tmp_path / "report")
    assert report.comparison.group_keys == ["adapter"]
    assert sorted(report.summary.group) == ["adapter=full", "adapter=lora"]
    assert report.summary["tuned/test/loss:n"].tolist() == [2, 2]
    tags = yaml.safe_load((sweep / "3" / "resolved_config.yaml").read_text())["tags"]
    assert tags == ["adapter=lora", "seed=1"]


@pytest.mark.slow
def test_multirun_with_ddp_runs_each_job_once_in_its_own_dir(tmp_path):
    tunelab_train(tmp_path, "-m", "trainer=ddp", "trainer.precision=32-true", "seed=0,1", "study=ddp", *QUICK)
    sweep = only_sweep_dir(tmp_path)        # the children launched no sweep of their own
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    assert all((j / "metrics.json").is_file() for j in jobs)     # the second job did not hang
    assert not list(tmp_path.glob("outputs/*/runs"))           # no stray run dirs from rank 1


# --- the W&B sweep file ----------------------------------------------------------------------------

def agent_commands(sweep: dict) -> list[list[str]]:
    """The command lines `wandb agent` would run: W&B's own command builder, fed every listed value
    (and both ends of every range) of every parameter, in as few commands as that takes."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    choices = {k: p.get("values") or [p["min"], p["max"]] for k, p in sweep["parameters"].items()}
    assignments = [{k: v[i % len(v)] for k, v in choices.items()} for i in range(max(map(len, choices.values())))]
    commands = []
    for values in assignments:
        variables = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
        variables |= {"env": ["/usr/bin/env"], "program": [sweep["program"]], "interpreter": ["python"]}
        command = []
        for part in sweep_utils.create_sweep_command(sweep["command"]):
            command += variables.get(part[2:-1]) or [] if part.startswith("${") else [part]
        commands.append(command)
    return commands


@pytest.mark.parametrize("sweep_file", sorted((REPO_DIR / "sweeps").glob("wandb_*.yaml")), ids=lambda p: p.stem)
def test_the_wandb_sweep_builds_command_lines_that_compose(sweep_file):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["metric"]["name"].startswith(("tuned/", "base/", "train/"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for command in agent_commands(sweep):
            assert command[:2] == ["/usr/bin/env", "tunelab-train"]
            cfg = compose("train", overrides=command[2:])   # fails on an override that names no config
            for override in OverridesParser.create().parse_overrides(command[2:]):
                key = override.get_key_element()
                if key in sweep["parameters"]:   # the value the agent chose is the value the run gets
                    composed = OmegaConf.select(cfg, key)
                    composed = OmegaConf.to_object(composed) if OmegaConf.is_config(composed) else composed
                    assert composed == override.value(), (key, composed, override.input_line)
