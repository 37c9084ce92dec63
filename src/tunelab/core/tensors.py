"""Tensor helpers every method shares: positions under padding, the network under a PEFT wrapper."""

from __future__ import annotations

import torch


def unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay active)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for right or left padding alike."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).long().argmax(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens, so left padding shifts nothing (as generate() does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
