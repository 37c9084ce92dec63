"""Provenance: the manifest every run dir holds, the tokenizer/template fidelity gate, reproduce=RUN_DIR."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from tests.helpers import run_train
from tunelab.errors import TunelabError
from tunelab.paths import REPO_DIR
from tunelab.run.provenance import (MANIFEST, check_fidelity, compare_metrics, read_manifest, take_reproduce_arg,
                                tokenizer_hashes)

QUICK = ["eval.metrics={}", "eval.compare_base=false", "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: thread contention makes short fits several times slower
    try:
        run_train(folder, *QUICK)
    finally:
        torch.set_num_threads(threads)
    return folder


def test_every_run_dir_holds_a_manifest(run_dir, tokenizer):
    manifest = read_manifest(run_dir)
    assert manifest["seed"] == 42 and manifest["config"]["optimizer"]["lr"] == 1.0e-3
    assert manifest["config"]["paths"]["run_dir"] == str(run_dir)
    git = manifest["git"]
    # A commit of this repository (HEAD may have moved on since: others commit while tests run).
    known = subprocess.run(["git", "-C", str(REPO_DIR), "cat-file", "-t", git["commit"]], capture_output=True, text=True)
    assert known.stdout.strip() == "commit" and isinstance(git["dirty"], bool) and "diff" in git
    assert manifest["packages"]["torch"] and manifest["packages"]["transformers"]
    assert manifest["hardware"]["cpu_count"] >= 1
    data = manifest["data"]
    assert {"records", "tokenizer", "template", "preprocessing", "cache_key"} <= set(data)
    assert manifest["fidelity"] == {**tokenizer_hashes(tokenizer, "chat"), "template_setting": "chat"}


def test_the_gate_passes_the_training_tokenizer_and_refuses_another(run_dir, tokenizer):
    assert check_fidelity(run_dir, tokenizer, "chat") == []
    drifted = copy.deepcopy(tokenizer)
    drifted.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|>\n")
    with pytest.raises(TunelabError, match="differ.*allow_template_mismatch=true"):
        check_fidelity(run_dir, drifted, "chat")
    with pytest.raises(TunelabError, match="template"):
        check_fidelity(run_dir, tokenizer, "Q: {prompt} A: ")
    assert check_fidelity(run_dir, drifted, "chat", allow_mismatch=True) == ["template"]
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["<tunelab_new_token>"])
    assert "tokenizer" in check_fidelity(run_dir, extended, "chat", allow_mismatch=True)


def test_the_gate_accepts_the_tokenizer_saved_in_final_and_checks_only_run_folders(run_dir, tokenizer, tmp_path):
    from tunelab.models.loading import load_tokenizer
    from tunelab.run.provenance import gate_target

    saved = load_tokenizer(str(run_dir / "final"))  # padded left by generation before it was saved
    assert gate_target(str(run_dir / "final"), saved, "chat") == []
    with pytest.raises(TunelabError, match="template"):
        gate_target(str(run_dir / "final"), saved, "### Q: {prompt}")
    assert gate_target(str(run_dir / "final"), saved, "### Q: {prompt}", allow_mismatch=True) == ["template"]
    assert gate_target(str(tmp_path), saved, "### Q: {prompt}") == []  # not a run: nothing recorded to check


def test_a_run_dir_without_a_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(TunelabError, match="has no provenance.json"):
        read_manifest(tmp_path)
    with pytest.raises(TunelabError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    argv = ["tunelab-train", f"reproduce={tmp_path}"]
    with pytest.raises(TunelabError, match=MANIFEST):
        take_reproduce_arg(argv)


def test_reproduce_replays_the_recorded_overrides_into_a_fresh_dir(run_dir, tmp_path):
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["overrides"] = ["debug=fast", "optimizer.lr=0.01", "ckpt_path=auto"]
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    argv = ["tunelab-train", f"reproduce={run_dir}", "seed=3"]
    original, again = take_reproduce_arg(argv)
    assert original == run_dir and again.parent == run_dir / "reproduce"
    assert argv[1:] == ["debug=fast", "optimizer.lr=0.01", f"hydra.run.dir={again}", "seed=3"]


def test_metric_comparison_ignores_timings_and_flags_real_gaps(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    same = compare_metrics(metrics, copy.deepcopy(metrics), rtol=0.0)
    assert same and all(r["match"] for r in same)
    assert not any("seconds" in r["metric"] or "memory" in r["metric"] for r in same)
    moved = copy.deepcopy(metrics)
    moved["tuned"]["test/loss"] *= 1.01
    bad = [r["metric"] for r in compare_metrics(metrics, moved, rtol=1e-4) if not r["match"]]
    assert bad == ["tuned/test/loss"]


@pytest.mark.slow
def test_reproduce_cli_reruns_a_run_and_reports_a_match(tmp_path):
    env_run = [sys.executable, "-m", "tunelab.cli.train", "debug=fast", "trainer.enable_progress_bar=false", *QUICK]
    first = subprocess.run([*env_run, f"hydra.run.dir={tmp_path / 'a'}"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([sys.executable, "-m", "tunelab.cli.train", f"reproduce={tmp_path / 'a'}",
                            f"hydra.run.dir={tmp_path / 'b'}"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "metrics match" in again.stdout
    assert (tmp_path / "b" / "metrics.json").is_file()
