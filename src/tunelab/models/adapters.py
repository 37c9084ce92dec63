"""Which parameters move: full fine-tuning or a PEFT adapter given by its own config class."""

from __future__ import annotations

import torch


class FullFineTuning:
    """Every parameter trains (the `adapter=full` choice)."""

    def __repr__(self) -> str:
        return "FullFineTuning()"


def apply_adapter(model: torch.nn.Module, adapter) -> torch.nn.Module:
    """The model to train: unchanged for full fine-tuning, wrapped by PEFT for a PeftConfig."""
    from peft import PeftConfig, get_peft_model

    if adapter is None or isinstance(adapter, FullFineTuning):
        model.requires_grad_(True)
        return model
    if isinstance(adapter, PeftConfig):
        from tunelab.models.sentence import add_lora, is_sentence_transformer

        if is_sentence_transformer(model):  # LoRA goes on its transformer module; the model stays a SentenceTransformer
            return add_lora(model, adapter)
        return get_peft_model(model, adapter)
    raise TypeError(f"adapter must be FullFineTuning or a peft.PeftConfig, got {type(adapter).__name__}")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
