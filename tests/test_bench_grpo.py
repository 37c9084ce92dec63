"""benchmarks/bench_grpo.py at a tiny size on the CPU, so it cannot rot: both runners train on the same
workload and report what the JSON promises; TRL's vLLM row says why it cannot run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {"model": "tiny", "prompts": 2, "generations": 2, "completion_length": 3, "temperature": 0.7, "device": "cpu",
        "precision": "32-true", "warmup": 1, "timed": 1, "vllm_server_base_url": None}


@pytest.fixture
def bench():
    sys.path.insert(0, str(BENCH))
    import bench_grpo

    yield bench_grpo
    sys.path.remove(str(BENCH))
    from tunelab.core.generation import configure

    configure(None)


def test_both_runners_train_the_same_workload_and_are_summarized(bench, tmp_path, one_thread):
    results = {}
    for runner in ("tunelab-hf", "trl-hf"):
        result = (bench.run_tunelab if runner.startswith("tunelab") else bench.run_trl)({**TINY, "runner": runner},
                                                                                        tmp_path / runner)
        results[runner] = {**result, "status": "ok", "summary": bench.summarize(result)}
    for runner, result in results.items():
        assert len(result["updates"]) == 2, runner  # warm-up + timed updates, one optimizer step each
        summary = result["summary"]
        # 2 prompts x 2 completions of at most 3 tokens: what was generated is what the engine sampled
        assert 0 < summary["generated_tokens_per_update"] <= 12, runner
        assert summary["generated_tok_per_s"] > 0 and summary["trained_tok_per_s"] > 0, runner
        assert 0 < summary["generation_share"] < 1 and summary["peak_memory_mb"] > 0, runner
    trained = {r: results[r]["updates"][-1]["trained_tokens"] for r in results}
    generated = {r: results[r]["updates"][-1]["generated_tokens"] for r in results}
    # the training forward sees prompt + completion tokens: more than was generated, for both alike
    assert all(trained[r] > generated[r] for r in results)
    ratios = bench.ratios(results)
    assert set(ratios) == {"tunelab_over_trl_updates_per_s_hf"} and ratios["tunelab_over_trl_updates_per_s_hf"] > 0


def test_trl_with_vllm_says_why_it_cannot_run_here(bench, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(bench.NotRunnable, match="needs vllm importable in the training environment"):
        bench.check_trl_vllm({**TINY, "runner": "trl-vllm"})


@pytest.mark.slow
def test_the_script_end_to_end_writes_json_naming_the_machine(tmp_path):
    out = tmp_path / "bench.json"
    runners = "tunelab-hf,trl-hf,trl-vllm"
    result = subprocess.run([sys.executable, str(BENCH / "bench_grpo.py"), "--model", "tiny", "--warmup", "1",
                             "--timed", "1", "--completion-length", "3", "--prompts", "2", "--generations", "2",
                             "--precision", "32-true", "--device", "cpu", "--runners", runners, "--out", str(out),
                             "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] and report["machine"]["cpu_capability"]
    assert report["settings"]["precision"] == "32-true" and list(report["runners"]) == runners.split(",")
    assert report["runners"]["tunelab-hf"]["status"] == report["runners"]["trl-hf"]["status"] == "ok"
    assert report["runners"]["trl-vllm"]["status"].startswith("not run: ")
    assert "tunelab-hf" in result.stdout and "s/update" in result.stdout
