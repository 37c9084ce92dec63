"""A model from an earlier run dir (e.g. the SFT stage of a pipeline): its `final/` (or `merged/`).

A LoRA `final/` is merged into its base on load, so a new adapter (or full fine-tuning) starts from
the tuned weights, and an adapter-disabled forward is the tuned model: the right PPO reference."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models.loading import load_tokenizer


def load_run_model(run_dir: str, dtype: str = "float32", attn_implementation: str | None = "sdpa"):
    """(model, tokenizer) of a finished run dir, its final/ folder, or any HF/adapter folder."""
    from transformers import AutoModelForCausalLM

    path = Path(str(run_dir)).expanduser()
    folder = next((f for f in (path / "merged", path / "final", path) if f.is_dir() and
                   ((f / "config.json").is_file() or (f / "adapter_config.json").is_file())), None)
    if folder is None:
        raise TunelabError(f"{run_dir} holds no model (no final/ or merged/ with config.json or adapter_config.json); "
                           "point model.run_dir at a finished tunelab run")
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                         attn_implementation=attn_implementation).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation)
    if not hasattr(model, "generate") or model.config.architectures and not any(
            a.endswith("ForCausalLM") for a in model.config.architectures):
        raise TunelabError(f"{folder} is not a causal LM ({model.config.architectures}); use an sft/pretrain run")
    return model, load_tokenizer(str(folder))
