"""benchmarks/bench_gpu_scale.py on a CPU at a tiny size, so it cannot rot before a GPU runs it at size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_scale.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_architecture_kept_in_the_repo_is_qwen2_5_0_5b():
    sys.path.insert(0, str(SCRIPT.parent))
    import torch
    from transformers import AutoModelForCausalLM

    import bench_gpu_scale

    config = bench_gpu_scale.arch_config({"arch": str(bench_gpu_scale.ARCH), "tiny": False, "attn": "sdpa"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's count


def test_one_tunelab_run_in_process_measures_a_packed_step(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_gpu_scale

    spec = {"mode": "lora", "seq_len": 96, "runner": "tunelab", "rows": 2, "steps": 2, "warmup": 1,
            "arch": str(bench_gpu_scale.ARCH), "tiny": True, "attn": "sdpa", "mean_doc": 24, "lr": 1e-4,
            "trainer": "cpu", "work": str(tmp_path)}
    result = bench_gpu_scale.worker(spec)
    assert result["timed_steps"] == 2 and result["tokens_per_s"] > 0 and result["flops_per_s"] > 0
    assert 0 < result["lora_params"] < result["params"] and result["peak_memory_mb"] > 0
    assert result["settings"]["runtime"]["chunked_loss"] is True


@pytest.mark.slow
def test_the_script_runs_tunelab_and_trl_for_both_modes_and_writes_json(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--seq-lens", "96", "--steps", "2", "--warmup", "1",
                           "--mean-doc", "24", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "cores" in report["machine"] and report["peak_flops"] > 0
    runs = {(r["spec"]["mode"], r["spec"]["runner"]): r for r in report["runs"]}
    assert set(runs) == {(m, r) for m in ("full", "lora") for r in ("tunelab", "trl-best")}
    assert all(r["timed_steps"] == 2 and r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in runs.values())
    assert runs[("full", "trl-best")]["settings"]["padding_free"] is True
