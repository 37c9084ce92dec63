"""The LoRA options (PEFT's use_dora, use_rslora, init_lora_weights, and LoRA+'s loraplus_lr_ratio) compose with
every method: the assembled module carries them, LoRA+ reaches each method's optimizer, and a method with a
reference starts from the model training started from also when PiSSA leaves a residual under the adapter."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import METHODS, make_cfg
from tunelab.run.assemble import assemble, finalize

COMBINED = ["adapter.use_dora=true", "adapter.use_rslora=true", "adapter.init_lora_weights=gaussian",
            "adapter.loraplus_lr_ratio=16"]


def assembled(tmp_path, method: str, *overrides: str):
    model = ["model=tiny_sentence_transformer"] if method == "contrastive" else []
    cfg = finalize(make_cfg(tmp_path, f"method={method}", *model, "adapter=lora", "optimizer.lr=1e-3", *overrides))
    return assemble(cfg).module


def peft_config(module):
    from peft import PeftModel

    peft_model = next(m for m in module.modules() if isinstance(m, PeftModel))
    return next(iter(peft_model.peft_config.values()))


def learning_rates(module) -> dict[str, set[float]]:
    optimizer = module.build_optimizer()
    names = {id(p): n for n, p in module.named_parameters()}
    rates = {"lora_A": set(), "lora_B": set()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            kind = next((k for k in rates if k in names[id(p)]), None)
            if kind:
                rates[kind].add(round(group["lr"], 12))
    return rates


@pytest.mark.parametrize("method", METHODS)
def test_the_lora_options_compose_with_every_method(tmp_path, method):
    module = assembled(tmp_path, method, *COMBINED)
    config = peft_config(module)
    assert (config.use_dora, config.use_rslora, config.init_lora_weights) == (True, True, "gaussian")
    assert any("lora_magnitude_vector" in n for n, _ in module.named_parameters())  # DoRA's magnitudes train
    rates = learning_rates(module)
    assert rates == {"lora_A": {1e-3}, "lora_B": {16e-3}}, rates


def start_logits(tmp_path, method: str, *overrides: str):
    """(the reference's logits, the un-adapted start's logits) on one probe."""
    from tunelab.run.assemble import load_model

    module = assembled(tmp_path, method, "adapter.init_lora_weights=pissa", *overrides)
    start, _ = load_model(finalize(make_cfg(tmp_path, f"method={method}")))
    probe = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert module.ref_model is not None  # the adapter-disabled network is PiSSA's residual, not the start
    with torch.no_grad():
        return module.ref_model(probe).logits, start.eval()(probe).logits


@pytest.mark.parametrize("method, overrides", [("grpo", ["method.module.beta=0.04"]), ("ppo", []),
                                               pytest.param("rloo", [], marks=pytest.mark.slow),
                                               pytest.param("kto", [], marks=pytest.mark.slow)])
def test_a_reference_under_pissa_is_the_start_point(tmp_path, method, overrides):
    reference, start = start_logits(tmp_path, method, *overrides)
    assert torch.allclose(reference, start, atol=1e-3), (reference - start).abs().max()
