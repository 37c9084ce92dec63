"""Device and precision follow the machine: every branch with the capability queries faked, and a real
tiny run that records the concrete values it ran with."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from tests.helpers import make_cfg, run_train
from tunelab.platform import hardware


@pytest.fixture
def machine(monkeypatch):
    """Fake the capability queries; each test says what the machine has."""
    hardware.auto_precision.cache_clear()

    def set_machine(cuda=False, cuda_bf16=True, cpu_bf16=False, speedup=1.0, mps=False):
        monkeypatch.setattr(hardware, "cuda_visible", lambda: cuda)
        monkeypatch.setattr(hardware, "mps_visible", lambda: mps)
        monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: cpu_bf16)
        monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: speedup)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")

    yield set_machine
    hardware.auto_precision.cache_clear()


def test_avx2_cpu_trains_in_fp32(machine):
    machine(cpu_bf16=False)
    assert hardware.resolve_accelerator("auto") == "cpu"
    assert hardware.resolve_precision("auto", "cpu").value == "32-true"


def test_cpu_with_fast_native_bf16_trains_in_bf16(machine):
    machine(cpu_bf16=True, speedup=4.0)
    assert hardware.resolve_precision("auto", "cpu").value == "bf16-mixed"


def test_cpu_whose_bf16_instructions_are_slower_than_fp32_trains_in_fp32(machine):
    machine(cpu_bf16=True, speedup=0.6)
    choice = hardware.resolve_precision("auto", "cpu")
    assert choice.value == "32-true"
    assert "0.60x" in choice.reason


def test_visible_gpu_is_the_default_device_and_bf16_card_trains_in_bf16(machine):
    machine(cuda=True, cuda_bf16=True)
    assert hardware.resolve_accelerator("auto") == "gpu"
    assert hardware.resolve_precision("auto", "gpu").value == "bf16-mixed"


def test_gpu_without_bf16_trains_in_fp16(machine):
    machine(cuda=True, cuda_bf16=False)
    assert hardware.resolve_precision("auto", "gpu").value == "16-mixed"


def test_mps_is_chosen_when_visible_and_runs_fp32(machine):
    machine(mps=True)
    assert hardware.resolve_accelerator("auto") == "mps"
    assert hardware.resolve_precision("auto", "mps").value == "32-true"


def test_explicit_values_win(machine):
    machine(cuda=True, cpu_bf16=True, speedup=4.0)
    assert hardware.resolve_accelerator("cpu") == "cpu"
    assert hardware.resolve_precision("32-true", "cpu").value == "32-true"
    assert hardware.resolve_precision("16-mixed", "gpu").value == "16-mixed"


def test_explicit_bf16_on_a_cpu_without_it_warns_once_with_the_fix(machine, caplog):
    machine(cpu_bf16=False)
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        assert hardware.resolve_precision("bf16-mixed", "cpu").value == "bf16-mixed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "many times slower" in warnings[0] and "trainer.precision=auto" in warnings[0]


def test_evaluation_autocast_follows_the_same_resolution(machine):
    cpu = torch.device("cpu")
    machine(cpu_bf16=False)
    assert hardware.autocast_dtype("auto", cpu) is None
    assert hardware.autocast_dtype("32-true", cpu) is None
    assert hardware.autocast_dtype("bf16-mixed", cpu) is torch.bfloat16
    hardware.auto_precision.cache_clear()
    machine(cpu_bf16=True, speedup=4.0)
    assert hardware.autocast_dtype("auto", cpu) is torch.bfloat16
    assert hardware.autocast_dtype("16-mixed", cpu) is None  # fp16 autocast is for CUDA only


def test_measured_speedup_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    calls = []

    def fake_seconds(dtype, **_):
        calls.append(dtype)
        return 1.0 if dtype == torch.float32 else 0.25

    monkeypatch.setattr(hardware, "matmul_seconds", fake_seconds)
    assert hardware.cpu_bf16_speedup() == 4.0
    assert hardware.cpu_bf16_speedup() == 4.0
    assert len(calls) == 2  # measured once: fp32 and bf16
    cached = json.loads((tmp_path / "cpu_bf16_speedup.json").read_text())
    assert list(cached.values()) == [4.0] and torch.__version__ in next(iter(cached))


def test_the_default_config_is_auto_and_a_run_records_the_concrete_values(tmp_path, machine):
    machine(cpu_bf16=False)
    cfg = make_cfg(tmp_path)
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.precision == "auto"
    run_train(tmp_path, "eval.compare_base=false")
    resolved = yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())
    assert resolved["trainer"]["accelerator"] == "cpu"
    assert resolved["trainer"]["precision"] == "32-true"
    assert resolved["eval"]["precision"] == "32-true"  # evaluation at the precision training ran at
    manifest = json.loads((tmp_path / "provenance.json").read_text())
    assert manifest["config"]["trainer"]["precision"] == "32-true"


def test_explicit_trainer_cpu_keeps_auto_precision(tmp_path):
    cfg = make_cfg(tmp_path, "trainer=cpu")
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "auto"
