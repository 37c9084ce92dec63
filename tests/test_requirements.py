"""What a config needs beyond tunelab's own dependencies is checked when it is composed, in one line with the install
command, before a model loads or a dir is made; every `_target_` resolves, in one line.

A package is made missing for real: a package of its name first on the path whose import fails, as an absent (or
broken) install does, so the outcome does not depend on what this machine has installed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli.common import preflight
from tunelab.errors import TunelabError

ROOT = Path(__file__).resolve().parents[1]


def without(tmp_path: Path, monkeypatch, *modules: str) -> Path:
    """`modules` cannot be imported in this process (and in processes given the returned PYTHONPATH entry)."""
    shadow = tmp_path / "shadow"
    for name in modules:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError(\"No module named '{name}'\")\n")
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.syspath_prepend(str(shadow))
    return shadow


@pytest.mark.parametrize("args, missing, install", [
    (["logger=mlflow"], ["mlflow"], "pip install mlflow"),
    (["logger=tensorboard"], ["tensorboard", "tensorboardX"], "pip install tensorboard"),
    (["adapter=qlora"], ["bitsandbytes"], "pip install 'bitsandbytes>=0.45'"),
    (["eval=lm_eval"], ["lm_eval"], "pip install 'lm-eval>=0.4.13,<0.5'"),
    (["-m", "hydra/launcher=local_processes", "seed=0,1"], ["submitit"], "pip install 'hydra-submitit-launcher"),
    (["-m", "hydra/launcher=slurm", "seed=0,1"], ["submitit"], "pip install 'hydra-submitit-launcher"),
    (["-m", "hydra/launcher=ray", "seed=0,1"], ["ray"], "pip install 'ray>=2.40,<3'"),
    (["-m", "hydra/sweeper=optuna", "seed=0,1"], ["optuna"], "pip install 'optuna>=5,<6'"),
])
def test_a_missing_optional_package_is_one_line_with_the_install_command(tmp_path, monkeypatch, args, missing, install):
    without(tmp_path, monkeypatch, *missing)
    with pytest.raises(TunelabError) as raised:
        preflight(["debug=fast", *args], "train")
    message = str(raised.value)
    assert install in message and "\n" not in message, message
    choice = next(a for a in args if "=" in a and not a.startswith("seed"))
    assert message.startswith(choice), message


def test_slurm_without_slurm_here_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    with pytest.raises(TunelabError, match="hydra/launcher=slurm cannot start here: sbatch is not on PATH") as raised:
        preflight(["debug=fast", "-m", "hydra/launcher=slurm", "seed=0,1"], "train")
    assert "hydra/launcher=parallel" in str(raised.value)


def test_a_missing_logger_package_stops_the_cli_before_a_model_loads_or_a_dir_is_made(tmp_path, monkeypatch):
    shadow = without(tmp_path, monkeypatch, "mlflow")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT), str(ROOT / "src")])}
    result = subprocess.run([sys.executable, "-m", "tunelab.cli.train", "debug=fast", "logger=mlflow",
                             f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: logger=mlflow") and line.endswith("pip install mlflow"), line
    assert not run_dir.exists()


@pytest.mark.parametrize("override, fragment", [
    ("method.module.rewards.correct._target_=tunelab.methods.rewards.NoSuchReward",
     "tunelab.methods.rewards has no attribute 'NoSuchReward'"),
    ("+eval.metrics.mine._target_=no_such_package.Metric", "no module named 'no_such_package'"),
])
def test_a_target_that_does_not_resolve_is_one_line_and_nothing_else(override, fragment, caplog, capfd):
    with caplog.at_level(logging.DEBUG), pytest.raises(TunelabError) as raised:
        preflight(["debug=fast", "method=grpo", override], "train")
    message = str(raised.value)
    assert message.startswith(override.lstrip("+").split("=")[0]) and fragment in message and "\n" not in message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # Hydra's own two lines are gone
    assert "Are you sure" not in capfd.readouterr().err


def test_a_reward_built_at_run_time_from_a_bad_target_is_one_line(caplog):
    from tunelab.methods.rewards import build_reward

    with caplog.at_level(logging.DEBUG), pytest.raises(TunelabError, match="has no attribute 'NoSuchReward'"):
        build_reward("correct", {"_target_": "tunelab.methods.rewards.NoSuchReward"})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_locate_reports_a_module_whose_own_import_fails(tmp_path, monkeypatch):
    from tunelab.config.options import locate

    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    obj, why = locate("broken_plugin.Thing")
    assert obj is None and why.startswith("importing broken_plugin") and "no_such_dependency" in why
    assert locate("tunelab.methods.rewards.NumericAnswerReward")[0].__name__ == "NumericAnswerReward"
