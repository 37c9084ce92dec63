"""What one rollout holds (prompts, sampled completions, rewards, the sampling policy's and the reference's
log-probs, values, advantages), how its completions are scored, how it splits into minibatches, and where the
reference comes from. The module (module.py) fills it: sampling itself is its one `generate` method."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.methods.rewards import check_scores


@dataclass
class Rollout:
    query: torch.Tensor                  # left-padded prompts, each repeated num_generations times (adjacent)
    query_mask: torch.Tensor
    response: torch.Tensor               # sampled tokens, pad after the first EOS
    mask: torch.Tensor                   # response tokens up to and including the first EOS
    loss_mask: torch.Tensor              # mask, without truncated completions when mask_truncated_completions
    has_eos: torch.Tensor
    texts: list[str]
    prompts: list[str]
    references: list
    scores: dict                         # {reward name: (B,)}
    rewards: torch.Tensor                # (B,) weighted sum, less missing_eos_penalty, clipped to score_clip
    old_logprobs: torch.Tensor | None    # the sampling policy's, re-scored by the trainer (None: equal to the first pass)
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    engine_logprobs: torch.Tensor | None  # what the generation engine said it sampled with (None: it did not say)
    kl: torch.Tensor | None = None       # (B, T) KL per token, masked, where it goes in the reward
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.query)


def score(reward, prompts, texts, references, has_eos, missing_eos_penalty, score_clip):
    """({name: scores}, total) of the completions: each reward checked by `check_scores`, summed with its weight,
    less missing_eos_penalty for a completion with no EOS, clipped to [-score_clip, score_clip]."""
    if reward is None:  # a loss with no reward (on-policy distillation)
        return {}, torch.zeros(len(texts))
    scores = reward.scores(prompts, texts, references)
    total = reward.total(scores)
    if missing_eos_penalty is not None:
        total = total - missing_eos_penalty * (~has_eos.cpu()).float()
    if score_clip is not None:
        total = total.clamp(-score_clip, score_clip)
    return scores, total


def monitor_scores(monitors: dict, prompts, texts, references) -> dict:
    return {name: check_scores(fn(prompts=prompts, responses=texts, references=references), len(texts), name)
            for name, fn in monitors.items()}


def minibatch_indices(size: int, num_generations: int, num_minibatches: int, shuffle: bool) -> list[torch.Tensor]:
    """Completion indices of each minibatch: whole groups, in sampling order (so the first minibatch of the first
    pass repeats the rollout's forward and its ratio is exactly 1) or, with `shuffle`, in a new order of groups."""
    groups = size // num_generations
    if groups % num_minibatches:
        raise TunelabError(f"a batch of {groups} prompts ({size} completions) does not divide into "
                           f"method.module.num_minibatches={num_minibatches} whole groups; "
                           "make data.batch_size a multiple of it")
    order = torch.randperm(groups) if shuffle else torch.arange(groups)
    members = (order[:, None] * num_generations + torch.arange(num_generations)).flatten()
    return list(members.chunk(num_minibatches))


def load_reference(name: str):
    """A frozen network from a run dir (its final/ or merged/), an HF folder, or a model name (embedded:NAME)."""
    from tunelab.models.loading import load_pretrained
    from tunelab.models.run_model import load_run_model

    model, _ = load_run_model(name) if Path(str(name)).expanduser().exists() else load_pretrained(name)
    return model.requires_grad_(False).eval()


def check_vocabulary(policy, reference, name: str) -> None:
    """The reference scores the policy's tokens: both must have the same vocabulary (TRL asks the same)."""
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (policy, reference)]
    if sizes[0] != sizes[1]:
        raise TunelabError(f"method.module.reference_model={name} has a vocabulary of {sizes[1]} tokens, the policy "
                           f"{sizes[0]}; the reference (the teacher) must share the policy's tokenizer")
