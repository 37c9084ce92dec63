"""adapter=qlora on the tiny model, offline, CPU: the body's Linear layers really are bitsandbytes 4-bit, only
LoRA trains, a few Lightning steps move the loss and the LoRA weights, merged/ is a plain fp32 model (the
dequantised base with LoRA merged) giving the adapter's logits, and without bitsandbytes it refuses in one line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import make_cfg, read_metrics, run_train
from tunelab.errors import TunelabError
from tunelab.models.adapters import build_adapter
from tunelab.models.loading import load_pretrained

bnb = pytest.importorskip("bitsandbytes", reason="adapter=qlora needs bitsandbytes (the dev extra installs it)")

# tiny_llama: 2 decoder layers x (q, k, v, o, gate, up, down); lm_head (tied to the embedding) stays full precision
FOUR_BIT_LAYERS = 2 * 7


@pytest.mark.parametrize("speedup, auto_is, computes", [(0.5, "32-true", torch.float32), (4.0, "bf16-mixed", torch.bfloat16)],
                         ids=["auto-fp32", "auto-bf16"])
def test_qlora_base_is_4bit_and_only_lora_trains(tmp_path, cpu_bf16, speedup, auto_is, computes):
    from tunelab.run.assemble import assemble, finalize

    cpu_bf16(speedup)  # both branches of `auto`, whatever this CPU is
    cfg = finalize(make_cfg(tmp_path, "adapter=qlora", "adapter.r=4", "adapter.target_modules=[q_proj,v_proj]"))
    assert cfg.trainer.precision == auto_is  # the 4-bit layers compute at the precision training runs at
    model = assemble(cfg).module.model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == FOUR_BIT_LAYERS
    for layer in layers.values():
        assert layer.weight.__class__.__name__ == "Params4bit" and layer.weight.dtype == torch.uint8
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant
        assert layer.compute_dtype == computes
        assert not layer.support_avx512bf16_for_cpu  # eval computes as training does, not in bnb's own bf16 path
    inner = model.get_base_model()
    assert type(inner.lm_head) is torch.nn.Linear and inner.lm_head.weight.dtype == torch.float32
    assert inner.model.embed_tokens.weight.dtype == torch.float32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".q_proj." in n or ".v_proj." in n for n in trainable)


def test_qlora_trains_and_merged_is_plain_fp32_with_the_adapters_logits(tmp_path):
    run_train(tmp_path, "adapter=qlora", "merge=true", "eval.max_examples=2", "data.test_size=8", "trainer.max_steps=3",
              "optimizer.lr=1e-2")
    metrics = read_metrics(tmp_path)
    assert metrics["train"]["global_step"] == 3
    assert metrics["tuned"]["test/loss"] < metrics["base"]["test/loss"]  # the steps moved the loss ...
    from safetensors.torch import load_file

    lora_b = [t for n, t in load_file(tmp_path / "final" / "adapter_model.safetensors").items() if "lora_B" in n]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # ... and LoRA (B starts at zero)
    assert metrics["train"]["merge_max_logit_gap"] < 1e-3  # the merge gate, in memory: adapter vs merged

    for folder in ("merged", "base_model"):  # both plain fp32 HF models: the dequantised weights
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == "float32", folder
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    final = load_pretrained(str(tmp_path / "final"))[0].eval()  # adapter on its recorded (dequantised) base
    probe = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(final(probe).logits, merged(probe).logits, atol=1e-4)


@torch.no_grad()
def test_merge_gate_compares_in_fp32_when_the_4bit_layers_compute_in_bf16(tmp_path):
    """adapter.compute_dtype=bfloat16 (what bf16-mixed gives on a GPU): the adapter's own logits are bf16-rounded,
    so the gate evaluates the same weights in fp32, as it does for LoRA, and the merge matches within 1e-3."""
    from tunelab.models.export import save_merged
    from tunelab.run.assemble import assemble, finalize

    parts = assemble(finalize(make_cfg(tmp_path, "adapter=qlora", "adapter.compute_dtype=bfloat16")))
    model = parts.module.model.eval()
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.05)  # a trained-looking adapter
    probe = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    bf16_logits = model(**probe).logits
    gap = save_merged(model, parts.tokenizer, tmp_path / "merged", probe, tolerance=1e-3)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert gap < 1e-3 and (bf16_logits - merged(**probe).logits).abs().max() > 1e-3  # bf16 rounding alone fails the gate
    assert all(m.compute_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


def test_qlora_without_bitsandbytes_refuses_in_one_line_naming_what_it_needs(tmp_path, no_bitsandbytes):
    with pytest.raises(TunelabError, match=r"adapter=qlora needs bitsandbytes>=0\.45 \(pip install 'tunelab\[qlora\]'\)") \
            as caught:
        build_adapter(make_cfg(tmp_path, "adapter=qlora").adapter)
    assert "\n" not in str(caught.value) and "use adapter=lora" in str(caught.value)


def test_qlora_refusal_is_an_error_line_exit_2_and_writes_no_model(tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    script = ("import sys; sys.modules['bitsandbytes'] = None; from tunelab.cli.train import main; "
              f"sys.argv = ['tunelab-train', 'debug=fast', 'adapter=qlora', 'logger=none', 'hydra.run.dir={run}']; main()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in (out.stderr + out.stdout).splitlines() if "adapter=qlora needs" in line]
    assert len(lines) == 1 and lines[0].startswith("error: adapter=qlora needs bitsandbytes"), out.stderr[-2000:]
    assert not any((run / name).exists() for name in ("final", "merged", "base_model", "checkpoints", "metrics.json"))


@pytest.mark.parametrize("override, message", [
    ("adapter.bits=8", "adapter.bits=8: adapter=qlora quantises the base to 4 bits only"),
    ("adapter.quant_type=int4", "adapter.quant_type=int4 is unknown"),
    ("adapter.init_lora_weights=pissa", "adapter=qlora with adapter.init_lora_weights=pissa is not built"),
])
def test_bad_qlora_options_are_refused(tmp_path, override, message):
    with pytest.raises(TunelabError, match=message):
        build_adapter(make_cfg(tmp_path, "adapter=qlora", override).adapter)
