"""Rewards for RL methods: any callable `(prompts, responses, references) -> one float per response`.

Programmatic rewards (ROUGE against the reference, exact match, the numeric answer, a format regex, a
length penalty) serve verifiable tasks, experiments and ground-truth monitors; `RewardModelScorer` scores
with a reward model trained by method=reward. `build_rewards` turns a mapping of named `_target_` configs
into callables with one clear line for a name that does not resolve; `WeightedRewards` sums them.
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


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def final_number(text: str | None) -> float | None:
    """The answer a text gives: the content of its last \\boxed{...}, else its last number (commas
    as thousands separators allowed); None when it has none."""
    if text is None:
        return None
    boxed = BOXED.findall(text)
    numbers = NUMBER.findall(boxed[-1] if boxed else text)
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


class NumericAnswerReward:
    """1 when the response's final number (or its \\boxed{} answer) equals the reference's, else 0."""

    def __init__(self, tolerance: float = 1e-6):
        self.tolerance = tolerance

    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        scores = []
        for out, ref in zip(responses, references):
            want, got = final_number(ref), final_number(out)
            scores.append(float(want is not None and got is not None and abs(want - got) <= self.tolerance))
        return scores


class FormatReward:
    """1 when the response matches `pattern` (the whole response with fullmatch=true), else 0."""

    def __init__(self, pattern: str, fullmatch: bool = True):
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise TunelabError(f"FormatReward pattern {pattern!r} is not a regular expression ({err})") from None
        self.fullmatch = fullmatch

    def __call__(self, prompts: list[str], responses: list[str], references=None) -> list[float]:
        match = self.regex.fullmatch if self.fullmatch else self.regex.search
        return [float(match(out.strip()) is not None) for out in responses]


class LengthPenalty:
    """-per_word for every word past max_words (0 within it): a nudge towards short answers."""

    def __init__(self, max_words: int = 20, per_word: float = 0.05):
        self.max_words, self.per_word = max_words, per_word

    def __call__(self, prompts: list[str], responses: list[str], references=None) -> list[float]:
        return [-self.per_word * max(0, len(out.split()) - self.max_words) for out in responses]


def build_reward(name: str, config):
    """A reward callable from a `_target_` config: a class is instantiated with the other keys, a plain
    function is used as it is (TRL's reward functions are plain functions)."""
    import inspect

    from hydra.utils import instantiate

    from tunelab.config.options import locate

    if callable(config):
        return config
    target = config.get("_target_") if hasattr(config, "get") else None
    if not target:
        raise TunelabError(f"reward {name!r} has no _target_; give one, e.g. "
                           f"method.module.rewards.{name}._target_=tunelab.methods.rewards.NumericAnswerReward")
    obj, why = locate(target)
    if obj is None:
        raise TunelabError(f"reward {name!r}: _target_ {target!r} does not resolve to an importable callable ({why}); "
                           "check the module path and name (e.g. tunelab.methods.rewards.NumericAnswerReward)")
    extra = [k for k in config if not str(k).startswith("_") and k != "_target_"]
    if inspect.isfunction(obj) and not extra:
        return obj
    return instantiate(config, _convert_="all")


def build_rewards(configs) -> dict:
    """{name: callable} in config order; a null entry switches that reward off."""
    rewards = {str(name): build_reward(str(name), cfg) for name, cfg in (configs or {}).items() if cfg is not None}
    if not rewards:
        raise TunelabError("no reward is set; give at least one under method.module.rewards")
    return rewards


class WeightedRewards:
    """The weighted sum of several named rewards, each checked by `check_scores` (TRL's reward_weights)."""

    def __init__(self, rewards: dict, weights: list[float] | None = None):
        self.rewards = build_rewards(rewards)
        weights = [1.0] * len(self.rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.rewards):
            raise TunelabError(f"reward_weights has {len(weights)} values for {len(self.rewards)} rewards "
                               f"({', '.join(self.rewards)}); give one weight per reward, in that order")
        self.weights = dict(zip(self.rewards, weights))

    def scores(self, prompts, responses, references) -> dict[str, torch.Tensor]:
        """{name: scores of shape (n,)} of every reward."""
        return {name: check_scores(fn(prompts=prompts, responses=responses, references=references), len(responses),
                                   name) for name, fn in self.rewards.items()}

    def total(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in scores.items())

    def __call__(self, prompts, responses, references) -> torch.Tensor:
        return self.total(self.scores(prompts, responses, references))

    def to(self, device) -> "WeightedRewards":
        for fn in self.rewards.values():
            if hasattr(fn, "to"):
                fn.to(device)
        return self


class RewardModelScorer:
    """Scores with a reward model from a method=reward run dir (or its final/), on the same text a
    reward model is trained on: the prompt, the response and the template's end of turn."""

    def __init__(self, run_dir: str, batch_size: int = 32, precision: str | None = "auto"):
        from tunelab.methods.reward_model import load_reward_model

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
        from tunelab.methods.reward_model import reward_scores

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
