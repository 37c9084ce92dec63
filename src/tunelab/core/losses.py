"""The token-weighted next-token loss every method and the evaluator share, the split path that runs the LM
head only where the loss looks, and the chunked LM head (`runtime.chunked_loss`) that never holds the
whole [tokens x vocab] logits."""

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


def model_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """input_ids and attention: a packed batch (data.packing) gets its position ids and no 2-D mask, which
    transformers turns into per-document attention (a block-diagonal causal mask for SDPA/eager; for
    FlashAttention, which reads documents only from one flat row, the batch is first made padding-free).
    No KV cache: with one, transformers would not read the position ids as document edges."""
    if batch.get("position_ids") is None:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if uses_flash_attention(model):
        real = batch["attention_mask"].bool()
        return {"input_ids": batch["input_ids"][real][None], "position_ids": batch["position_ids"][real][None],
                "use_cache": False}
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


def model_labels(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The labels laid out as model_inputs lays out the tokens (one flat row for FlashAttention on packed rows;
    each document's first label is IGNORE, so no target crosses a row edge there)."""
    if batch.get("position_ids") is not None and uses_flash_attention(model):
        return batch["labels"][batch["attention_mask"].bool()][None]
    return batch["labels"]


def uses_flash_attention(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", "") or "").startswith("flash")


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


def supervised_loss_sum(backbone: torch.nn.Module, head: torch.nn.Module, batch: dict,
                        chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """token_loss_sum without the full logits: the head runs only where the next token is supervised
    (and, with chunk_size, over that many tokens at a time: chunked_nll_sum).

    In SFT the prompt is most of the tokens, so this skips most of the (batch, length, vocab) logits,
    their softmax and their memory; the loss and gradients are the same.
    """
    hidden = backbone(**model_inputs(backbone, batch)).last_hidden_state
    targets = model_labels(backbone, batch)[:, 1:]
    supervised = targets != IGNORE
    hidden, targets = hidden[:, :-1][supervised], targets[supervised]
    if chunk_size:
        return chunked_nll_sum(hidden, head, targets, chunk_size), supervised.sum()
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum"), supervised.sum()


# -- the chunked LM head --------------------------------------------------------------------------------------
# Where the plain path holds [tokens, vocab] logits in fp32 (plus their softmax for backward: 2 x 4 bytes x
# tokens x vocab, 5 GB at 8k tokens and a 152k vocabulary), these hold one [chunk, vocab] block at a time.
# Like Liger's fused linear cross-entropy (and TRL's fused LM head), the gradient of each chunk is taken
# while its logits are at hand, so nothing is recomputed where the upstream gradient is known to be a
# scalar (a summed loss); per-token log-probs, whose upstream gradient is one number per token, keep
# d logp / d hidden per token and recompute the logits in backward only for a trained head weight.


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype the head would run in here: autocast's, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def softmax_minus_onehot(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """d(-log p[target]) / d logits = softmax - onehot, in place over fp32 logits."""
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    return grad


class ChunkedNLLSum(torch.autograd.Function):
    """sum over rows of -log softmax(hidden @ weight.T)[target], chunk by chunk, gradients taken in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, dtype, need_hidden, need_weight):
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(targets), chunk_size):
                h, t = hidden[start : start + chunk_size].to(dtype), targets[start : start + chunk_size]
                logits = (h @ w.t()).float()
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_hidden or need_weight:
                    grad = softmax_minus_onehot(logits, t, lse).to(dtype)
                    if need_hidden:
                        grad_hidden[start : start + chunk_size] = grad @ w
                    if need_weight:
                        grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


class ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, chunk by chunk; d/d hidden kept from forward, the
    weight's gradient (full fine-tuning of the head) from logits recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, dtype, need_hidden, need_weight):
        w = weight.to(dtype)
        logps = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty_like(logps)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(targets), chunk_size):
                h, t = hidden[start : start + chunk_size].to(dtype), targets[start : start + chunk_size]
                logits = (h @ w.t()).float()
                lse = lse_all[start : start + chunk_size] = logits.logsumexp(-1)
                logps[start : start + chunk_size] = logits.gather(1, t[:, None]).squeeze(1) - lse
                if need_hidden:  # d logp / d hidden = (onehot - softmax) @ W
                    grad_hidden[start : start + chunk_size] = -(softmax_minus_onehot(logits, t, lse).to(dtype) @ w)
        ctx.save_for_backward(grad_hidden, hidden if need_weight else None, weight if need_weight else None,
                              targets, lse_all)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return logps

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, hidden, weight, targets, lse_all = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output[:, None].to(grad_hidden.dtype)
        grad_weight = None
        if weight is not None:
            dtype, size = ctx.dtype, ctx.chunk_size
            w, grad_weight = weight.to(dtype), torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, len(targets), size):
                    h, t = hidden[start : start + size].to(dtype), targets[start : start + size]
                    grad = softmax_minus_onehot((h @ w.t()).float(), t, lse_all[start : start + size])
                    grad_weight -= (grad * grad_output[start : start + size, None]).to(dtype).t() @ h
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def plain_linear_weight(head: torch.nn.Module) -> torch.Tensor | None:
    """The weight of a head that is exactly `hidden @ weight.T` on an ordinary tensor, else None (a LoRA'd,
    4-bit, biased or sharded head goes through the general chunked path)."""
    from tunelab.models.qlora import is_4bit_layer

    if type(head) is not torch.nn.Linear or head.bias is not None or is_4bit_layer(head):
        return None
    weight = head.weight
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            return None
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    return weight


def checkpointed_token_logprobs(hidden, head, targets, chunk_size) -> torch.Tensor:
    """Any head: each chunk's logits are made, used and dropped; backward makes them again (one more head
    forward, the price of generality)."""
    from torch.utils.checkpoint import checkpoint

    def chunk_logps(h, t):
        return torch.log_softmax(head(h).float(), -1).gather(1, t[:, None]).squeeze(1)

    parts = [checkpoint(chunk_logps, hidden[s : s + chunk_size], targets[s : s + chunk_size], use_reentrant=False)
             for s in range(0, len(targets), chunk_size)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def grad_flags(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[bool, bool]:
    on = torch.is_grad_enabled()
    return on and hidden.requires_grad, on and weight.requires_grad


def chunked_nll_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """sum of -log p(target) of rows of hidden under head, never more than chunk_size rows of logits at once."""
    weight = plain_linear_weight(head)
    if weight is None:
        return -checkpointed_token_logprobs(hidden, head, targets, chunk_size).sum()
    return ChunkedNLLSum.apply(hidden, weight, targets, int(chunk_size), compute_dtype(hidden), *grad_flags(hidden, weight))


def chunked_token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                           chunk_size: int) -> torch.Tensor:
    """log p(target) per row of hidden under head (fp32), never more than chunk_size rows of logits at once."""
    weight = plain_linear_weight(head)
    if weight is None:
        return checkpointed_token_logprobs(hidden, head, targets, chunk_size)
    return ChunkedTokenLogprobs.apply(hidden, weight, targets, int(chunk_size), compute_dtype(hidden),
                                      *grad_flags(hidden, weight))


# runtime.chunked_loss reaches every loss through the model it trains (the preference losses call
# core.logprobs with the model alone); tunelab.core.runtime sets and removes this attribute.
CHUNK_ATTRIBUTE = "tunelab_loss_chunk_size"


def loss_chunk_size(model: torch.nn.Module) -> int | None:
    """Tokens per LM-head chunk while runtime.chunked_loss is on for this model, else None (the plain head)."""
    return getattr(model, CHUNK_ATTRIBUTE, None)
