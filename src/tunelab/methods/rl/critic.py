"""The optional critic: a value per response token, from a linear head on the policy's last hidden state
(`critic=head`) or from a trainable copy of a reward model (`critic=RUN_DIR`, a method=reward run), and its
clipped value loss (PPO's)."""

from __future__ import annotations

import torch

from tunelab.core.tensors import masked_mean, masked_var, position_ids, unwrap
from tunelab.errors import TunelabError

HEAD = "head"


def build_critic(model, critic: str | None) -> torch.nn.Module | None:
    """None, a zero-initialised linear head on the policy (its first values are 0), or a reward model to train."""
    if critic in (None, ""):
        return None
    if critic == HEAD:
        head = torch.nn.Linear(unwrap(model).config.hidden_size, 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return head
    from tunelab.core.logprobs import disable_dropout
    from tunelab.methods.reward_model import load_reward_model

    try:
        value, _ = load_reward_model(critic)
    except TunelabError as err:
        raise TunelabError(f"method.module.critic={critic!r}: {err}; use `head` or a method=reward run dir") from None
    disable_dropout(value)
    return value.requires_grad_(True).train()


def is_head(critic: torch.nn.Module | None) -> bool:
    """A head reads the policy's own hidden states (so the policy's forward must return them)."""
    return isinstance(critic, torch.nn.Linear)


def values_from(critic: torch.nn.Module, output, query, query_mask, response, mask) -> torch.Tensor:
    """(B, T) values at the positions that predict each response token, as the log-probs are taken."""
    from tunelab.methods.reward_model import HEAD as SCORE

    start = query.shape[1] - 1
    if is_head(critic):
        hidden = output.hidden_states[-1][:, start:-1]
        return critic(hidden.to(critic.weight.dtype)).squeeze(-1).float()
    ids, attention = torch.cat([query, response], 1), torch.cat([query_mask, mask], 1)
    inner = unwrap(critic)
    hidden = getattr(inner, inner.base_model_prefix)(input_ids=ids, attention_mask=attention,
                                                     position_ids=position_ids(attention), use_cache=False).last_hidden_state
    return getattr(inner, SCORE)(hidden[:, start:-1]).squeeze(-1).float()


def value_loss(values, old_values, returns, mask, cliprange_value: float | None):
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped kept within cliprange_value of the old value."""
    losses = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * masked_mean(losses, mask), torch.zeros(())
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped_losses = (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(losses, clipped_losses), mask), masked_mean(
        (clipped_losses > losses).float(), mask)


def explained_variance(values, returns, mask) -> torch.Tensor:
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
