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
    monkeypatch.delenv(hardware.SPEEDUP_ENV, raising=False)  # the suite's pin off: these tests fake the probe itself

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


def test_measured_speedup_is_cached_per_machine(tmp_path, monkeypatch, machine):
    machine(cpu_bf16=True)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", REAL_SPEEDUP)  # the real probe, with the matmul timing faked
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
    # Another CPU kind with the same name (cloud CPUs often share one) is another entry, never this one's figure.
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: False)
    assert hardware.cpu_bf16_speedup() == 4.0 and len(calls) == 4
    assert len(json.loads((tmp_path / "cpu_bf16_speedup.json").read_text())) == 2


REAL_SPEEDUP = hardware.cpu_bf16_speedup


@pytest.mark.parametrize("speedup, expected", [(4.0, "bf16-mixed"), (0.5, "32-true"), (0.017, "32-true")])
@pytest.mark.parametrize("native_bf16", [True, False])
def test_a_pinned_probe_decides_auto_on_any_cpu_without_measuring(machine, monkeypatch, tmp_path, native_bf16,
                                                                   speedup, expected):
    """TUNELAB_CPU_BF16_SPEEDUP (what the suite pins): both branches on every machine, nothing timed or cached."""
    machine(cpu_bf16=native_bf16)
    monkeypatch.setattr(hardware, "matmul_seconds", lambda *a, **k: pytest.fail("the pinned probe must not time"))
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setenv(hardware.SPEEDUP_ENV, str(speedup))
    choice = hardware.resolve_precision("auto", "cpu")
    assert choice.value == expected and hardware.SPEEDUP_ENV in choice.reason
    assert not (tmp_path / "cpu_bf16_speedup.json").exists()


@pytest.mark.parametrize("value", ["fast", "0", "-1"])
def test_a_bad_pinned_probe_is_one_line(machine, monkeypatch, value):
    from tunelab.errors import TunelabError

    monkeypatch.setenv(hardware.SPEEDUP_ENV, value)
    with pytest.raises(TunelabError, match=hardware.SPEEDUP_ENV) as err:
        hardware.resolve_precision("auto", "cpu")
    assert "\n" not in str(err.value)


def test_the_suite_runs_with_auto_pinned_whatever_this_cpu_is():
    """tests/conftest.py: no test reads this machine's probe (or a cached one from another machine)."""
    import os

    assert os.environ[hardware.SPEEDUP_ENV] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert hardware.resolve_accelerator("auto") == "cpu"
    assert "not measured" in hardware.auto_precision("cpu").reason


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
