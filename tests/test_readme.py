"""Every command line of README.md and of the `--help` texts works as written in bash.

README convention: commands sit in ```bash blocks; `$RUN` is a finished run dir (the README sets it);
a line that cannot run here says so in its comment (`# needs a network`, `# needs a GPU`,
`# needs deepspeed`, `# needs mlflow`, `# needs SLURM`, `# needs vLLM`).
Default suite: bash splits every line (brace expansion, quotes, redirections, pipes show here) and
each tunelab command's overrides compose exactly as the CLI's pre-flight composes them.
`-m slow`: every `tunelab-train` line runs for real on the tiny model (debug=fast added).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli.common import preflight
from tunelab.errors import TunelabError

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("tunelab-train", "tunelab-evaluate", "tunelab-verify", "tunelab-data", "tunelab-report",
            "tunelab-chat", "tunelab-review", "make")
CANNOT_RUN_HERE = re.compile(r"#.*needs (a network|a GPU|deepspeed|mlflow|SLURM|vLLM)")
# What pre-flight says when a line needs what this machine lacks.
REFUSED_FOR = {"a network": "hub is unreachable", "a GPU": "GPU", "deepspeed": "pip install deepspeed",
               "mlflow": "pip install mlflow", "SLURM": "hydra/launcher=slurm"}
CONFIG_OF = {"tunelab-train": "train", "tunelab-evaluate": "evaluate", "tunelab-verify": "train",
             "tunelab-data": "train"}


def readme_lines() -> list[str]:
    lines, inside = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.strip().startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and line.strip() and not line.strip().startswith("#"):
            lines.append(line.strip())
    return lines


def help_lines() -> list[str]:
    """The example lines of `--help`, as the user sees them."""
    lines = []
    for program in ("train", "evaluate"):
        shown = subprocess.run([sys.executable, "-m", f"tunelab.cli.{program}", "--help"], capture_output=True,
                               text=True, timeout=120, check=True).stdout
        lines += [line.strip() for line in shown.splitlines() if re.match(r"tunelab-\w+(\s|$)", line.strip())]
    return lines


EXAMPLES = readme_lines() + help_lines()


def bash_calls(line: str, env: dict, brace_expansion: bool = True) -> list[list[str]]:
    """The argv of every known program the line calls, exactly as bash splits it (programs are stubbed)."""
    stubs = "".join(f"{p}() {{ printf '%s\\0' {p} \"$@\"; printf '\\n'; }}\n" for p in PROGRAMS)
    stubs += "" if brace_expansion else "set +B\n"
    result = subprocess.run(["bash", "-c", stubs + line], capture_output=True, text=True, env=env, cwd=env["WORK"])
    assert result.returncode == 0 and not result.stderr, f"bash: {line}\n{result.stderr}"
    return [call.strip("\0").split("\0") for call in result.stdout.splitlines() if call.strip("\0")]


def write_example_data(work: Path) -> None:
    """The files the README's data lines name, since pre-flight reads a local data file."""
    pairs = [(f"What comes after {i}?", f"{i + 1}.") for i in range(24)]
    for name in ("my.jsonl", "other.jsonl"):
        (work / name).write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in pairs))
    (work / "qa.csv").write_text("question,answer\n" + "".join(f'"{q}",{a}\n' for q, a in pairs))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("readme")
    run = work / "outputs" / "default" / "runs" / "example"
    run.mkdir(parents=True)  # what `ls` finds where the README picks the newest run
    write_example_data(work)
    return {**os.environ, "RUN": str(run), "WORK": str(work)}


def test_the_readme_has_examples_to_check():
    assert len(readme_lines()) > 30 and len(help_lines()) > 8


@pytest.mark.parametrize("line", EXAMPLES)
def test_example_is_valid_bash_and_composes(line, env, monkeypatch):
    monkeypatch.chdir(env["WORK"])  # where the example data files are, as for the commands bash runs
    calls = bash_calls(line, env)
    assert calls or re.match(r"^[A-Z_]+=", line), f"no known command in: {line}"  # or a variable the next lines use
    # {a,b} unquoted is split by bash into several arguments: the line must mean the same without it
    assert calls == bash_calls(line, env, brace_expansion=False), f"bash brace-expands part of: {line}; quote it"
    makefile = (REPO / "Makefile").read_text()
    for program, *args in calls:
        if program == "make":
            assert all(re.search(rf"^{re.escape(a)}:", makefile, re.M) for a in args if "=" not in a), line
            continue
        if program == "tunelab-data":
            args = [a for a in args if a != "inspect" and not a.startswith("--")]
        if program in CONFIG_OF and "--help" not in args:
            try:
                preflight(args, CONFIG_OF[program])
            except TunelabError as err:
                need = CANNOT_RUN_HERE.search(line)
                if need and REFUSED_FOR.get(need.group(1), "\0") in str(err):
                    continue  # pre-flight says in one line what this machine lacks (the tests run offline)
                pytest.fail(f"{line}\n -> {err}")


TRAIN_EXAMPLES = [line for line in EXAMPLES if line.startswith("tunelab-train") and not CANNOT_RUN_HERE.search(line)
                  and "--help" not in line and "--cfg" not in line]


@pytest.mark.slow
@pytest.mark.parametrize("line", TRAIN_EXAMPLES)
def test_train_example_runs_on_the_tiny_model(line, env, tmp_path):
    """The real command, as bash runs it, with debug=fast and a short run added."""
    fast = "debug=fast trainer.max_steps=2 eval.max_examples=2 eval.compare_base=false"
    if " -m " in f" {line} ":
        fast += f" hydra.sweep.dir={tmp_path}/sweep"
    else:
        fast += f" hydra.run.dir={tmp_path}/run"
    pythonpath = f"{REPO}:{os.environ.get('PYTHONPATH', '')}"
    stub = f'tunelab-train() {{ "{sys.executable}" -m tunelab.cli.train "$@" {fast}; }}\n'
    result = subprocess.run(["bash", "-c", stub + line], capture_output=True, text=True, timeout=900,
                            env={**env, "PYTHONPATH": pythonpath}, cwd=env["WORK"])
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"


def conf_examples() -> list[tuple[str, str]]:
    """(file, line) of every `tunelab-train ...` example in the comments of conf/**/*.yaml; a `for` loop spread
    over several comment lines is one example."""
    from tunelab.paths import CONF_DIR

    examples = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        loop = ""
        for line in path.read_text().splitlines():
            text = line.strip().removeprefix("#").strip() if line.strip().startswith("#") else None
            if text is None:
                loop = ""
                continue
            if loop or text.startswith("for "):
                loop = f"{loop} {text}".strip()
                if re.search(r"\bdone\b", text):
                    examples.append((str(path.relative_to(CONF_DIR)), loop))
                    loop = ""
            elif text.startswith("tunelab-train "):
                examples.append((str(path.relative_to(CONF_DIR)), text))
    return examples


CONF_EXAMPLES = conf_examples()


def test_the_config_comments_have_examples_to_check():
    assert len(CONF_EXAMPLES) > 50 and any(line.startswith("for ") for _, line in CONF_EXAMPLES)


@pytest.mark.parametrize("where, line", CONF_EXAMPLES, ids=[f"{w}: {line[:60]}" for w, line in CONF_EXAMPLES])
def test_config_comment_example_is_valid_bash_and_composes(where, line, env):
    """What a config's comment shows composes as written (compose only: no data file or machine check)."""
    from tunelab.cli.common import check_override_keys, command_overrides, compose_checked, first_of_sweeps

    calls = bash_calls(line, env)
    assert calls and all(program == "tunelab-train" for program, *_ in calls), f"{where}: {line}"
    assert calls == bash_calls(line, env, brace_expansion=False), f"{where}: bash brace-expands part of: {line}; quote it"
    for _, *args in calls:
        concrete = first_of_sweeps(command_overrides(args))
        try:
            cfg = compose_checked("train", concrete)
            check_override_keys(cfg, concrete)
        except TunelabError as err:
            if "needs the Hydra plugin" in str(err):
                pytest.skip(f"this machine lacks the plugin the example needs: {err}")
            pytest.fail(f"{where}: {line}\n -> {err}")
