"""The `final/` folder: a model `AutoModelForCausalLM.from_pretrained` loads, with its tokenizer
(`SentenceTransformer(final)` for a sentence-transformers model, LoRA merged in)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models.adapters import adapter_changes_base, is_peft
from tunelab.models.qlora import computing_in, dequantized_adapter, dequantized_base, is_4bit


def save_final(model, tokenizer, folder: Path, base_path: str | None) -> Path:
    """Adapter folder for PEFT models (its base recorded by path), full weights otherwise."""
    from tunelab.models.sentence import is_sentence_transformer, save_sentence_transformer

    if is_sentence_transformer(model):
        return save_sentence_transformer(model, folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_peft(model):
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_path
    model.save_pretrained(tmp)
    if is_peft(model) and adapter_changes_base(model):
        plain_lora_init(tmp / "adapter_config.json")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def plain_lora_init(config_file: Path) -> None:
    """PiSSA / OLoRA: the recorded base is the residual already, and PEFT re-runs a string init when it loads
    an adapter (splitting the base again), so the saved config says plain LoRA, as PEFT's docs advise."""
    import json

    config = json.loads(config_file.read_text())
    config["init_lora_weights"] = True
    config_file.write_text(json.dumps(config, indent=2))


def save_base(model, folder: Path) -> str:
    """Write the frozen base of a PEFT model (for bases with no folder of their own, e.g. the tiny model)."""
    # unload() on a copy strips the LoRA layers; saving get_base_model() would keep their
    # `base_layer` names, which a plain from_pretrained does not recognise.
    # A 4-bit base (adapter=qlora) is saved dequantised: the fp32 weights the adapter trained against.
    base = dequantized_base(model) if is_4bit(model) else copy.deepcopy(model).unload()
    base.save_pretrained(folder)
    return str(folder)


@torch.no_grad()
def save_merged(model, tokenizer, folder: Path, probe: dict[str, torch.Tensor], tolerance: float) -> float:
    """Merge LoRA into a copy of the weights, check it gives the adapter's logits, and save it.

    Over a 4-bit base (adapter=qlora) the copy is the adapter on the dequantised fp32 base, so the merge is
    fp32 W + BA and merged/ is a plain fp32 model (PEFT's merge into a Linear4bit would re-quantise it)."""
    merged = (dequantized_adapter(model) if is_4bit(model) else copy.deepcopy(model)).merge_and_unload()
    model.eval()
    merged.eval()
    with computing_in(model, torch.float32):  # a no-op unless 4-bit layers compute in another dtype
        expected = model(**probe).logits
    got = merged(**probe).logits
    gap = (expected - got).abs().max().item()
    if gap > tolerance:
        raise TunelabError(
            f"merged model differs from the adapter model by {gap:.2e} in logits (> merge_tolerance={tolerance}); "
            "not exporting it"
        )
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return gap
