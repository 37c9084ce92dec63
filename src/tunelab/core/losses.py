"""The token-weighted next-token loss every method and the evaluator share, and the split path that runs
the LM head only where the loss looks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.tokenize import IGNORE


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over supervised positions, number of those positions)."""
    targets = labels[:, 1:]
    logits = logits[:, :-1]
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


# Config fields that rescale or cap logits after the head: such models keep the plain path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling", "lm_head_multiplier")


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder stack, LM head) of a plain or LoRA-wrapped causal LM whose logits are head(hidden), else None."""
    base = model
    if hasattr(model, "get_base_model"):  # a PeftModel
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            return None  # virtual tokens live in PeftModel.forward, which the split path would skip
        base = model.get_base_model()
    config = getattr(base, "config", None)
    text = config.get_text_config() if config is not None else None
    if text is None or any(getattr(text, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(backbone, torch.nn.Module) or backbone is base or head is None:
        return None
    return backbone, head


def supervised_loss_sum(backbone: torch.nn.Module, head: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """token_loss_sum without the full logits: the head runs only where the next token is supervised.

    In SFT the prompt is most of the tokens, so this skips most of the (batch, length, vocab) logits,
    their softmax and their memory; the loss and gradients are the same.
    """
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE
    logits = head(hidden[:, :-1][supervised])
    return F.cross_entropy(logits.float(), targets[supervised], reduction="sum"), supervised.sum()
