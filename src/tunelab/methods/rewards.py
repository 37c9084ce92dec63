"""Rewards for RL methods: any callable `(prompts, responses, references) -> one float per response`.

Programmatic rewards (ROUGE against the reference, exact match) serve experiments and ground-truth
monitors; `RewardModelScorer` scores with a reward model trained by method=reward.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from tunelab.errors import TunelabError


def check_scores(scores, count: int, source: str) -> torch.Tensor:
    """The reward as a float tensor of shape (count,), or a clear error: never a silent wrong reward."""
    try:
        tensor = torch.as_tensor(scores if torch.is_tensor(scores) else list(scores), dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise TunelabError(f"reward {source} returned {type(scores).__name__}, not numbers ({err}); "
                           "it must return one float per response") from None
    tensor = tensor.detach().float().cpu()
    if tensor.shape != (count,):
        raise TunelabError(f"reward {source} returned shape {tuple(tensor.shape)} for {count} responses; "
                           f"it must return one float per response, shape ({count},)")
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).nonzero().flatten().tolist()
        raise TunelabError(f"reward {source} returned NaN/inf for responses {bad[:5]}; fix the reward function")
    return tensor


class RougeReward:
    """ROUGE F-measure of the response against the reference, in [0, 1]."""

    def __init__(self, rouge_type: str = "rougeL"):
        from rouge_score import rouge_scorer

        self.rouge_type = rouge_type
        self.scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=False)

    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        if any(r is None for r in references):
            raise TunelabError("RougeReward needs a reference per prompt; use data whose examples have answers")
        return [self.scorer.score(ref, out)[self.rouge_type].fmeasure for out, ref in zip(responses, references)]


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class ExactMatchReward:
    """1 when the response equals the reference up to case, punctuation and spacing; else 0."""

    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        return [float(ref is not None and normalise(out) == normalise(ref)) for out, ref in zip(responses, references)]


class RewardModelScorer:
    """Scores with a reward model from a method=reward run dir (or its final/), on the same text a
    reward model is trained on: the prompt, the response and the template's end of turn."""

    def __init__(self, run_dir: str, batch_size: int = 32, precision: str | None = "auto"):
        from tunelab.methods.reward import load_reward_model

        if not run_dir or not Path(str(run_dir)).expanduser().exists():
            raise TunelabError(f"reward run dir {run_dir!r} does not exist; point it at a method=reward run")
        self.model, self.tokenizer = load_reward_model(run_dir)
        self.batch_size, self.precision = batch_size, precision
        self.end_of_turn = end_of_turn(self.tokenizer)

    def to(self, device) -> "RewardModelScorer":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], references=None) -> torch.Tensor:
        from tunelab.core.inference import autocast
        from tunelab.methods.reward import reward_scores

        device = next(self.model.parameters()).device
        texts = [p + r + self.end_of_turn for p, r in zip(prompts, responses)]
        scores = []
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "right"
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                       add_special_tokens=False).to(device)
                with autocast(self.precision, device):
                    scores.append(reward_scores(self.model, batch["input_ids"], batch["attention_mask"]).float())
        finally:
            self.tokenizer.padding_side = side
        return torch.cat(scores).cpu()


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message (e.g. '<|im_end|>\\n')."""
    marker = "\u2063MARKER\u2063"
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    return text.split(marker, 1)[1] if marker in text else tokenizer.eos_token


def describe(reward) -> str:
    return getattr(reward, "__name__", None) or type(reward).__name__


def finite_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
