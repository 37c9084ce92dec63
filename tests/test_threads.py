"""runtime.threads: auto is this machine's cores / the jobs the launcher runs at once, never more than torch would
take by itself; an explicit value wins; the count that ran is in resolved_config.yaml and provenance.json."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import make_cfg, run_train
from tunelab.errors import TunelabError
from tunelab.platform import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def machine(monkeypatch, restore_threads):
    """cores on this machine, torch's own thread count, and the launcher's jobs at once (a joblib multirun)."""
    def set_machine(cores: int, own: int, n_jobs: int | None = None):
        monkeypatch.setattr(threads, "machine_cores", lambda: cores)
        torch.set_num_threads(own)
        if n_jobs is not None:
            cfg = OmegaConf.create({"mode": "RunMode.MULTIRUN",
                                    "launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher."
                                                             "JoblibLauncher", "n_jobs": n_jobs}})
            real = threads.jobs_at_once
            monkeypatch.setattr(threads, "jobs_at_once", lambda: real(cfg))  # the real reading of a joblib multirun
    return set_machine


@pytest.mark.parametrize("cores, own, n_jobs, expected", [
    (2, 2, None, 2),   # one job: every core
    (2, 2, 2, 1),      # two trials at once on 2 cores: a thread each (was 2 each)
    (16, 16, 4, 4),
    (2, 2, 3, 1),      # more jobs than cores: at least one
    (8, 1, None, 1),   # OMP_NUM_THREADS=1 (or the caller) asked for fewer: auto never raises it
])
def test_auto_is_cores_over_jobs_at_once_capped_by_what_torch_was_given(machine, cores, own, n_jobs, expected):
    machine(cores, own, n_jobs)
    chosen = threads.resolve_threads("auto")
    assert chosen.count == expected, chosen
    if n_jobs:
        assert "hydra.launcher.n_jobs" in chosen.reason


def test_an_explicit_count_wins_and_a_bad_one_is_one_line(machine):
    machine(cores=2, own=2, n_jobs=2)
    assert threads.resolve_threads(3).count == 3 and threads.resolve_threads("3").reason == "set explicitly"
    for bad in (0, "many", -1):
        with pytest.raises(TunelabError, match="runtime.threads=.* must be auto or an integer >= 1"):
            threads.resolve_threads(bad)


def test_machine_cores_counts_the_cpus_this_process_may_use():
    import os

    assert 1 <= threads.machine_cores() <= len(os.sched_getaffinity(0))


def test_a_run_sets_and_records_its_threads(tmp_path, restore_threads):
    torch.set_num_threads(2)
    run_train(tmp_path, "runtime.threads=1", "eval.compare_base=false", "trainer.max_steps=1")
    assert torch.get_num_threads() == 1
    resolved = OmegaConf.load(tmp_path / "resolved_config.yaml")
    assert resolved.runtime.threads == 1
    manifest = json.loads((tmp_path / "provenance.json").read_text())
    assert manifest["config"]["runtime"]["threads"] == 1 and manifest["hardware"]["torch_threads"] == 1
    assert "torch_interop_threads" in manifest["hardware"]


def test_auto_is_written_as_the_count_that_ran(tmp_path, restore_threads):
    from tunelab.run.assemble import finalize

    torch.set_num_threads(1)
    cfg = finalize(make_cfg(tmp_path))
    assert cfg.runtime.threads == 1 and torch.get_num_threads() == 1
