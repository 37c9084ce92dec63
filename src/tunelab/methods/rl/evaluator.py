"""Evaluation of a policy on held-out prompts: greedy answers from the one generation engine
(`tunelab.core.generation`), scored by reward callables. method=ppo, grpo, rloo and distill use it, and
eval=verifiable scores any method's policy with it."""

from __future__ import annotations

import torch

from tunelab.core.generation import generate_completions
from tunelab.eval.result import EvalResult
from tunelab.methods.rewards import WeightedRewards, check_scores
from tunelab.methods.rl.module import build_monitors


class PolicyEvaluator:
    """Greedy responses to held-out prompts, scored by `reward` (`test/reward`) and each monitor (`test/<name>`)."""

    def __init__(self, reward, monitors: dict | None = None, split: str = "test", max_examples: int | None = 64,
                 batch_size: int = 32, max_new_tokens: int = 32, precision: str | None = "auto",
                 compare_base: bool = True, generation: dict | None = None):
        self.reward, self.monitors = reward, {name: fn for name, fn in (monitors or {}).items() if fn is not None}
        self.split, self.max_examples, self.batch_size = split, max_examples, batch_size
        self.precision, self.compare_base = precision, compare_base
        # generate() arguments, spelled as eval=default spells them (eval.generation.max_new_tokens=...)
        self.generation = {"do_sample": False, "max_new_tokens": max_new_tokens, **(generation or {})}

    @torch.no_grad()
    def run(self, model, datamodule) -> EvalResult:
        examples = datamodule.examples.get(self.split, [])[: self.max_examples or None]
        if not examples:
            return EvalResult()
        device = next(model.parameters()).device
        for fn in [self.reward, *self.monitors.values()]:
            if hasattr(fn, "to"):
                fn.to(device)
        prompts = [datamodule.formatter.generation_prompt(list(e.prompt)) for e in examples]
        references = [e.reference for e in examples]
        sampling = dict(self.generation)
        completions = generate_completions(model, datamodule.tokenizer, prompts, batch_size=self.batch_size,
                                           max_new_tokens=sampling.pop("max_new_tokens"), precision=self.precision,
                                           description=f"answering {self.split} prompts", **sampling)
        texts = [c.text for c in completions]
        rows = [{"prompt": e.prompt[-1]["content"], "reference": ref, "prediction": t}
                for e, ref, t in zip(examples, references, texts)]
        metrics = {}
        for name, fn in {"reward": self.reward, **self.monitors}.items():
            scores = check_scores(fn(prompts=prompts, responses=texts, references=references), len(texts), name)
            metrics[f"{self.split}/{name}"] = scores.mean().item()
            for row, s in zip(rows, scores.tolist()):
                row[name] = s
        metrics[f"{self.split}/response_words"] = sum(len(t.split()) for t in texts) / len(texts)
        metrics[f"{self.split}/eos_fraction"] = sum(c.finished for c in completions) / len(completions)
        return EvalResult(metrics, rows)


class GroupPolicyEvaluator(PolicyEvaluator):
    """Greedy answers to held-out prompts, scored by the weighted reward (`test/reward`) and by each
    reward on its own (`test/<name>`: with the shipped arithmetic task, `test/correct` is accuracy)."""

    def __init__(self, rewards, reward_weights: list[float] | None = None, monitors: dict | None = None, **kwargs):
        total = WeightedRewards(rewards, reward_weights)
        super().__init__(total, {**total.rewards, **build_monitors(monitors)}, **kwargs)
