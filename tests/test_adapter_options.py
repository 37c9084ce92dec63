"""The adapter options under PEFT's names (use_dora, use_rslora, init_lora_weights) and LoRA+: each composes
with sft and dpo, trains a few steps, and its final/ and merged/ give the adapter's logits; bad values are
refused in one line. adapter=qlora (4-bit base): tests/test_qlora.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import make_cfg, read_metrics, run_train
from tunelab.errors import TunelabError
from tunelab.models.adapters import build_adapter
from tunelab.models.loading import load_pretrained

OPTIONS = {"dora": ["adapter.use_dora=true"], "rslora": ["adapter.use_rslora=true"],
           "pissa": ["adapter.init_lora_weights=pissa"], "olora": ["adapter.init_lora_weights=olora"],
           "gaussian": ["adapter.init_lora_weights=gaussian"], "loraplus": ["adapter.loraplus_lr_ratio=16"]}


# Each option x {sft, dpo}; the dpo runs but PiSSA's (whose reference needs care) are marked slow to keep the
# fast suite short.
CASES = [(o, "sft") for o in OPTIONS] + [
    pytest.param(o, "dpo", marks=[] if o == "pissa" else pytest.mark.slow) for o in OPTIONS]


@pytest.mark.parametrize("option, method", CASES)
def test_adapter_option_trains_and_merges_within_tolerance(tmp_path, option, method):
    extra = ["data.max_train_examples=16", "data.val_size=8", "data.test_size=8"] if method == "dpo" \
        else ["eval.max_examples=2"]
    run_train(tmp_path, f"method={method}", "adapter=lora", *OPTIONS[option], *extra, "merge=true",
              "trainer.max_steps=3", "optimizer.lr=1e-2")
    assert read_metrics(tmp_path)["train"]["merge_max_logit_gap"] < 1e-3
    probe = torch.tensor([[1, 2, 3, 4, 5, 6]])
    final = load_pretrained(str(tmp_path / "final"))[0].eval()  # the adapter on its recorded base, as evaluate loads it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(final(probe).logits, merged(probe).logits, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dpo_reference_is_the_start_point_when_the_init_changes_the_base(init):
    """PiSSA / OLoRA leave a residual base under the adapter: the reference must be the merged start, so
    DPO starts at ln 2 (the adapter-disabled residual would not)."""
    from peft import LoraConfig

    from tests.test_dpo import PAIRS
    from tunelab.core.logprobs import pair_logps
    from tunelab.data.preference import PaddingCollator, PairTokenizer, normalize_pairs
    from tunelab.data.templates import PromptFormatter
    from tunelab.methods.dpo import LN2, DPOModule
    from tunelab.models import build_tiny_llama
    from tunelab.models.adapters import apply_adapter

    model, tokenizer = build_tiny_llama()
    spec = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    module = DPOModule(apply_adapter(model, spec), optimizer=None)
    assert module.ref_model is not None
    rows, _ = PairTokenizer()(normalize_pairs(PAIRS), PromptFormatter(tokenizer), 64)
    batch = PaddingCollator(tokenizer.pad_token_id)(rows)
    loss, _ = module.step_stats(batch)
    assert loss.item() == pytest.approx(LN2, abs=1e-4)
    with module.model.disable_adapter():
        residual = pair_logps(module.model, batch, module.pad_id)[0]
    assert not torch.allclose(residual, pair_logps(module.ref_model, batch, module.pad_id)[0], atol=1e-2)


def test_loraplus_gives_b_a_larger_learning_rate_than_a(tmp_path):
    from tests.test_adapter_methods import learning_rates
    from tunelab.run.assemble import assemble, finalize

    cfg = finalize(make_cfg(tmp_path, "adapter=lora", "adapter.loraplus_lr_ratio=16", "optimizer.lr=1e-3"))
    module = assemble(cfg).module
    assert learning_rates(module) == {"lora_A": {1e-3}, "lora_B": {0.016}}
    optimizer = module.build_optimizer()  # and every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("override, message", [
    ("adapter.init_lora_weights=svd", "adapter.init_lora_weights=svd is unknown"),
    ("adapter.loraplus_lr_ratio=0.5", "adapter.loraplus_lr_ratio=0.5 must be >= 1"),
])
def test_bad_adapter_options_are_refused(tmp_path, override, message):
    with pytest.raises(TunelabError, match=message):
        build_adapter(make_cfg(tmp_path, "adapter=lora", override).adapter)
