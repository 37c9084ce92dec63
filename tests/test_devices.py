"""Where models and tensors go on a CUDA machine, with torch's CUDA queries faked (no GPU here)."""

import warnings

import pytest
import torch

from tunelab.core.inference import autocast
from tunelab.eval.metrics import resolve_device
from tunelab.platform.hardware import training_device


@pytest.fixture
def cuda(monkeypatch):
    def fake(available: bool = True, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return fake


@pytest.mark.parametrize("available, expected", [(True, "cuda"), (False, "cpu")])
def test_auto_device_is_the_gpu_when_one_is_visible(cuda, available, expected):
    cuda(available)
    assert resolve_device("auto") == resolve_device(None) == expected
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize("accelerator, available, expected", [
    ("auto", True, "cuda"), ("auto", False, "cpu"), ("gpu", True, "cuda"), ("cuda", True, "cuda"), ("cpu", True, "cpu"),
])
def test_the_base_model_is_evaluated_where_it_will_train(cuda, accelerator, available, expected):
    cuda(available)
    assert training_device({"accelerator": accelerator}).type == expected


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_bf16_evaluation_on_a_gpu_without_bf16_runs_fp16(cuda, bf16, dtype):
    cuda(True, bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch disables the context itself here: there is no real GPU
        context = autocast("bf16", torch.device("cuda"))
    assert (context.device, context.fast_dtype) == ("cuda", dtype)


def test_cpu_autocast_is_unchanged():
    assert autocast("bf16", torch.device("cpu")).fast_dtype == torch.bfloat16
    assert not isinstance(autocast("32-true", torch.device("cpu")), torch.autocast)
    assert not isinstance(autocast("16-mixed", "cpu"), torch.autocast)


def test_local_judge_moves_its_model_to_the_resolved_device(monkeypatch, cuda):
    from tunelab.eval import judge

    moved = []

    class FakeModel:
        def to(self, device):
            moved.append(device)
            return self

    class FakeTokenizer:
        def apply_chat_template(self, *args, **kwargs):
            return "prompt"

    monkeypatch.setattr(judge, "local_judge_model", lambda name: (FakeModel(), FakeTokenizer()))
    monkeypatch.setattr("tunelab.core.generation.generate", lambda *args, **kwargs: ["Score: 3"])
    cuda(True)
    assert judge.LocalJudge("any")(["q"]) == ["Score: 3"]
    assert judge.LocalJudge("any", device="cpu")(["q"]) == ["Score: 3"]
    assert moved == ["cuda", "cpu"]
