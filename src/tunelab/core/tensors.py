"""Method-free tensor helpers: masked statistics, the end of a sampled response, left padding, position ids and
the model under a PEFT wrapper (torchtune's rlhf/ utilities play this part there)."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    count = mask.sum()
    return var * count / (count - 1) if unbiased and count > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions only; the rest is left as it was."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, x)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over each response up to and including its first EOS, whether an EOS came at all).

    Only the response is looked at: an EOS in the prompt (or pad == EOS) never ends a response."""
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.long().argmax(-1), torch.full_like(has_eos, responses.shape[1] - 1, dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions[None, :] <= first[:, None]).long(), has_eos


def to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int):
    """Prompts right-aligned, so that generation continues every prompt from the same position."""
    lengths = attention_mask.sum(-1)
    width = input_ids.shape[1]
    ids = torch.full_like(input_ids, pad_token_id)
    mask = torch.zeros_like(attention_mask)
    for i, n in enumerate(lengths.tolist()):
        real = input_ids[i][attention_mask[i].bool()]
        ids[i, width - n :], mask[i, width - n :] = real, 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens, so left padding shifts nothing (as generate() does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for right or left padding alike."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).long().argmax(-1)


def unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay active)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model
