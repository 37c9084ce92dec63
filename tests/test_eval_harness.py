"""eval=lm_eval: lm-eval's own HFLM, TaskManager and simple_evaluate on tiny local models and the shipped tasks.

The stubs are real transformers models (a tiny Llama whose forward is replaced), so every score goes through
lm-eval's request building, tokenisation, batching and metrics exactly as a real model's would."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import make_cfg, read_metrics
from tunelab.errors import TunelabError
from tunelab.eval.harness import LOCAL_TASKS_DIR, Harness, check_tasks

REPO = Path(__file__).resolve().parents[1]
MC = "tunelab_facts_mc"
CHOICES = 4
# Fast: a tiny model, few examples, no sentence-embedding metrics (they load MiniLM, beside the point here).
TRAIN = ["eval=lm_eval", "eval.max_examples=4", "eval.generation.max_new_tokens=4", "eval.harness.limit=8",
         "eval.metrics.semantic_similarity=null", "eval.metrics.error_analysis=null", "eval.review.export=false"]


def mc_docs() -> list[dict]:
    return [json.loads(line) for line in (LOCAL_TASKS_DIR / "facts_mc.jsonl").read_text().splitlines()]


def stub(kind: str, tokenizer):
    """A tiny Llama whose logits are fixed: `oracle` puts all its mass on the next token of each question's
    right answer (so the right option's log-likelihood is ~0 and every other option's far below), `uniform`
    gives every token the same probability."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from tunelab.models import build_tiny_llama

    model, _ = build_tiny_llama()
    vocab = model.config.vocab_size
    # The whole right sequence, tokenised as lm-eval's HFLM tokenises context + continuation.
    right = [tokenizer(f"Question: {d['question']}\nAnswer: {d['choices'][d['answer']]}", add_special_tokens=False)
             ["input_ids"] for d in mc_docs()]

    def forward(input_ids=None, **_):
        logits = torch.zeros(*input_ids.shape, vocab)
        if kind == "oracle":
            for row, ids in enumerate(input_ids.tolist()):
                target = max(right, key=lambda r: common_prefix(r, ids))
                for t in range(min(common_prefix(target, ids), len(target) - 1)):
                    logits[row, t, target[t + 1]] = 50.0
        return CausalLMOutputWithPast(logits=logits)

    model.forward = forward
    return model


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A harness cache of the test's own (only the harness's: TUNELAB_CACHE also holds the converted embedded model)."""
    monkeypatch.setattr("tunelab.eval.harness.cache_dir", lambda: tmp_path)
    return tmp_path / "harness"


def test_multiple_choice_gives_one_for_a_model_that_knows_and_chance_for_a_uniform_one(tokenizer, cache):
    harness = Harness(tasks=[MC], limit=None, cache=False)
    knows, summary = harness(stub("oracle", tokenizer), tokenizer, "32-true")
    assert knows[f"harness/{MC}/acc"] == 1.0 and knows[f"harness/{MC}/acc_norm"] == 1.0
    assert summary[f"{MC}/examples"] == len(mc_docs()) == 194
    guesses, _ = harness(stub("uniform", tokenizer), tokenizer, "32-true")
    # Equal token probabilities pick the option of fewest tokens; which one is right is shuffled, so that is chance.
    assert abs(guesses[f"harness/{MC}/acc"] - 1 / CHOICES) < 0.08, guesses
    assert not cache.exists()  # cache=false writes nothing


@pytest.mark.parametrize("speedup, auto_is", [(0.5, "32-true"), (4.0, "bf16-mixed")], ids=["auto-fp32", "auto-bf16"])
def test_scores_are_cached_per_model_and_a_fresh_lora_counts_as_its_base(tokenizer, cache, monkeypatch, cpu_bf16,
                                                                          speedup, auto_is):
    import lm_eval
    from peft import LoraConfig, get_peft_model

    from tunelab.models import build_tiny_llama

    assert cpu_bf16(speedup) == auto_is  # both branches of `auto`, whatever this CPU is
    calls = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k["tasks"]) or real(*a, **k))
    harness = Harness(tasks=[MC], limit=4)
    base, _ = build_tiny_llama()
    first = harness(base, tokenizer, auto_is)
    # A freshly attached LoRA (B = 0) computes the base model: a study's base scores, whatever the seed.
    torch.manual_seed(7)
    lora = get_peft_model(build_tiny_llama()[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert harness(lora, tokenizer, "auto") == first  # `auto` is cached as the precision it resolves to
    assert calls == [[MC]] and len(list(cache.glob("*.json"))) == 1
    with torch.no_grad():  # a trained adapter is another model
        next(p for n, p in lora.named_parameters() if "lora_B" in n).add_(0.5)
    harness(lora, tokenizer, auto_is)
    assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 2
    other = "32-true" if auto_is == "bf16-mixed" else "bf16-mixed"
    harness(base, tokenizer, other)  # another compute precision is another entry
    assert len(calls) == 3 and len(list(cache.glob("*.json"))) == 3


def test_an_unknown_task_name_is_one_line_with_the_local_tasks():
    with pytest.raises(TunelabError, match=r"no task 'tunelab_facts_mcq'; did you mean tunelab_facts_mc") as err:
        check_tasks(["tunelab_facts_mcq"])
    assert "\n" not in str(err.value)
    with pytest.raises(TunelabError, match="is empty"):
        check_tasks([])


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One harness cache for the run and its re-evaluation, empty before the run."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tunelab.eval.harness.cache_dir", lambda: folder)
        yield folder / "harness"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, module_cache) -> Path:
    from tunelab.run.train import train

    folder = tmp_path_factory.mktemp("run")
    train(make_cfg(folder, *TRAIN))
    return folder


def test_base_and_tuned_harness_scores_land_in_metrics_json_report_and_logger(run_dir):
    metrics = read_metrics(run_dir)
    for task, metric in ((MC, "acc"), (MC, "acc_norm"), ("tunelab_facts_gen", "exact_match")):
        key = f"harness/{task}/{metric}"
        base, tuned = metrics["base"][key], metrics["tuned"][key]
        assert 0 <= base <= 1 and 0 <= tuned <= 1
        assert metrics["delta"][key] == pytest.approx(tuned - base)
    assert metrics["summaries"]["base"]["harness"][f"{MC}/examples"] == 8  # eval.harness.limit
    assert "test/rouge1" in metrics["tuned"]  # beside the task metrics, not instead of them
    report = (run_dir / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith(f"| harness/{MC}/acc |"))
    assert row.count("|") == 5  # metric, base, tuned, delta
    assert "## Harness" in report
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        logged = [r for r in csv.DictReader(handle) if r.get(f"tuned/harness/{MC}/acc")]
    assert logged and logged[-1][f"base/harness/{MC}/acc"] != ""


def test_evaluate_a_run_with_lm_eval_reuses_the_scores_of_its_base_and_tuned_models(run_dir, module_cache, tmp_path,
                                                                                     monkeypatch):
    import lm_eval

    from tunelab.cli.evaluate import evaluate_target

    calls = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k["tasks"]))
    out = tmp_path / "evaluate"
    metrics = evaluate_target(make_cfg(out, f"target={run_dir}", "eval=lm_eval", fast=False, config="evaluate"))
    trained = read_metrics(run_dir)
    key = f"harness/{MC}/acc"
    assert calls == []  # both models' weights hash as in training: their scores come from the cache
    assert len(list(module_cache.glob("*.json"))) == 4  # 2 tasks x (base, tuned), all written by the training run
    assert metrics["base"][key] == trained["base"][key] and metrics["tuned"][key] == trained["tuned"][key]
    assert f"| {key} |" in (out / "report.md").read_text()


def cli(*args: str, timeout: int = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tunelab.cli.evaluate", *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=REPO)
    return result, time.perf_counter() - started


@pytest.mark.parametrize("task, says", [
    ("no_such_benchmark", "lm-eval has no task 'no_such_benchmark'"),
    ("arc_easy", "arc_easy read their data from the Hugging Face hub, but the hub is unreachable (HF_HUB_OFFLINE is set)"),
])
def test_a_bad_or_offline_task_on_the_command_line_is_one_error_line_and_exit_2(task, says, tmp_path):
    result, seconds = cli("model=tiny_llama", "eval=lm_eval", f"eval.harness.tasks=[{task}]",
                          f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and says in lines[-1], lines[-3:]
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "out").exists()  # refused before a run dir exists
    assert seconds < 90  # offline fails at once, not after the libraries' minute of retries
