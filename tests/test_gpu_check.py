"""benchmarks/gpu_check.sh: one clear line without a GPU, and every command line it runs composes."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_cfg

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def run_script(*args, **env):
    root = SCRIPT.parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(root / "src"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = run_script()
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: gpu_check: no CUDA GPU visible")


def test_every_training_command_it_runs_composes(tmp_path):
    result = run_script("--list", OUT=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    training = [shlex.split(line) for line in lines if "tunelab.cli.train" in line]
    names = {Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1]).name for cmd in training}
    assert names == {f"{m}-{a}" for m in ("sft", "dpo", "ppo") for a in ("lora", "full")} | {
        "grpo-lora", "grpo-lora-vllm", "sft-lora-ddp", "sft-lora-fsdp", "sft-full-fsdp"}
    assert "benchmarks/bench_sft.py --trainer gpu --modes lora --timed 10" in lines[-1]
    assert "benchmarks/bench_gpu_scale.py --steps 10 --warmup 3 --out" in lines[-3]
    assert "benchmarks/bench_grpo.py --device gpu --timed 10 --runners tunelab-hf,trl-hf,tunelab-vllm,trl-vllm" in lines[-2]
    assert "bash scripts/setup_vllm.sh" in lines
    for cmd in training:
        overrides = [a for a in cmd[cmd.index("tunelab.cli.train") + 1 :] if not a.startswith("hydra.")]
        cfg = make_cfg(tmp_path / "composed", *overrides, fast=False)
        assert cfg.trainer.max_steps == 10
