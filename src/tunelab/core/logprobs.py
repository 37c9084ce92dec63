"""Per-sequence log-probs of completions and the reference policy: what every preference method (DPO, KTO,
ORPO, SimPO/CPO) and its evaluator share."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tunelab.data.tokenize import IGNORE
from tunelab.errors import TunelabError
from tunelab.models.adapters import adapter_changes_base, is_peft


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each next token [B, T-1], 0 where labels[:, 1:] is IGNORE; that mask), at `temperature`.

    The LM head runs on the supervised positions only (as sft's loss does: the prompt, most of a preference
    row, never meets the [vocab]-wide head), and in chunks while runtime.chunked_loss is on for the model
    (core.losses.loss_chunk_size, chunked_token_logprobs). A model the split cannot read (prompt learning, a
    logit transform) takes the plain path. Gradients flow to the model either way.
    """
    from trl.trainer.utils import selective_log_softmax

    from tunelab.core.losses import backbone_and_head, chunked_token_logprobs, loss_chunk_size

    targets = labels[:, 1:]
    mask = targets != IGNORE
    split = backbone_and_head(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        picked, chunk = hidden[:, :-1][mask], loss_chunk_size(model)
        if chunk:
            picked = picked / temperature if temperature != 1.0 else picked  # (h/T) W^T = logits / T
            picked_logps = chunked_token_logprobs(picked, head, targets[mask], chunk)
        else:
            logits = head(picked).float()
            picked_logps = selective_log_softmax(logits / temperature if temperature != 1.0 else logits, targets[mask])
        logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        return logps.masked_scatter(mask, picked_logps), mask
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    logits = logits / temperature if temperature != 1.0 else logits
    return selective_log_softmax(logits, targets.masked_fill(~mask, 0)) * mask, mask


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of the supervised tokens, their count) per row."""
    logps, mask = token_logps(model, input_ids, attention_mask, labels)
    return logps.sum(-1), mask.sum(-1)


def stacked_pairs(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, padded to one width: one forward scores both."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(name: str, value: int) -> torch.Tensor:
        parts = [batch[f"{which}_{name}"] for which in ("chosen", "rejected")]
        return torch.cat([F.pad(p, (0, width - p.shape[1]), value=value) for p in parts])

    return both("input_ids", pad_id), both("attention_mask", 0), both("labels", IGNORE)


def pair_logps(model, batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-probs, rejected log-probs, chosen token counts, rejected token counts), summed per sequence;
    divide by the counts for the length-normalised log-probs of SimPO / ORPO."""
    logps, tokens = completion_logps(model, *stacked_pairs(batch, pad_id))
    return (*logps.chunk(2), *tokens.chunk(2))


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen answers over the batch (TRL's RPO / ORPO / CPO `nll_loss`)."""
    return -chosen_logps.float().sum() / chosen_tokens.sum().clamp(min=1)


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right; a tie counts one half (a coin flip), so policy == reference gives 0.5."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def frozen_reference(model, reference_model: str | None = None):
    """None when the adapter-disabled policy is the reference; otherwise a frozen network."""
    if reference_model:
        from tunelab.models.run_model import load_run_model

        reference, _ = load_run_model(reference_model)
    elif is_peft(model) and adapter_changes_base(model):
        # PiSSA / OLoRA move the principal part of each weight into the adapter, so the adapter-disabled
        # network is a residual, not the start point; merging the untrained adapter gives the start back.
        reference = copy.deepcopy(model).merge_and_unload()
    elif is_peft(model):
        if len(model.peft_config) > 1:
            raise TunelabError("the policy carries several adapters, so no single adapter-disabled reference exists; "
                               "merge the trained one first (model=run merges an SFT run's LoRA) or give "
                               "method.module.reference_model=RUN_DIR")
        return None
    else:
        reference = copy.deepcopy(model)
    return reference.requires_grad_(False).eval()


def disable_dropout(model) -> None:
    # Dropout would make policy and reference disagree at step 0 (loss != ln 2); TRL disables it too.
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
