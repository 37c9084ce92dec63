"""Judge a model on a held-out split: teacher-forced loss/perplexity and generation metrics."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.core.generation import generate_completions
from tunelab.core.inference import inference
from tunelab.core.losses import backbone_and_head, model_inputs, model_labels, supervised_loss_sum, token_loss_sum
from tunelab.eval.result import EvalResult

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, split: str = "test", metrics: dict | None = None, max_examples: int | None = 64,
                 batch_size: int = 16, precision: str | None = "auto", generation: dict | None = None,
                 compare_base: bool = True, few_shot: dict | None = None, during_training: dict | None = None,
                 report: dict | None = None, review: dict | None = None, harness=None):
        self.split = split
        self.metrics = {k: v for k, v in (metrics or {}).items() if v is not None}
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.precision = precision
        self.generation = dict(generation or {})
        self.compare_base = compare_base
        self.few_shot = {"k": 0, "seed": 0, "split": "train", **(few_shot or {})}
        self.during_training = {"every_n_epochs": 0, "split": "val", "max_examples": 16, **(during_training or {})}
        self.report = {"samples": 8, "per_example_table": True, **(report or {})}
        self.review = {"export": True, "seed": 0, **(review or {})}
        self.harness = harness  # a tunelab.eval.harness.Harness (eval=lm_eval), or None

    @torch.no_grad()
    def loss(self, model, datamodule, split: str | None = None) -> dict[str, float]:
        split = split or self.split
        dataset = datamodule.datasets.get(split)
        if dataset is None or not len(dataset):
            return {}
        device = next(model.parameters()).device
        split_model = backbone_and_head(model)  # the LM head only at the supervised tokens, as training does
        total, tokens = 0.0, 0
        with inference(model, self.precision):
            for batch in datamodule.loader(split, train=False, shard=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                if split_model is not None:
                    loss_sum, count = supervised_loss_sum(*split_model, batch)
                else:
                    logits = model(**model_inputs(model, batch)).logits
                    loss_sum, count = token_loss_sum(logits, model_labels(model, batch))
                total, tokens = total + loss_sum.item(), tokens + int(count)
        loss = total / max(tokens, 1)
        return {f"{split}/loss": loss, f"{split}/perplexity": math.exp(min(loss, 50.0))}

    def conversations(self, datamodule, split: str, max_examples: int | None) -> list:
        available = datamodule.conversations(split)
        if not available and datamodule.examples.get(split):
            # Raw text (method=pretrain) has no responses to generate: loss/perplexity still stand.
            log.warning("%s: no reference responses (raw text?), so generation metrics are skipped", split)
            return []
        if max_examples and len(available) > max_examples:
            log.info("%s: generating for the first %d of %d examples (eval.max_examples)", split, max_examples,
                     len(available))
        return available[: max_examples or None]

    def few_shot_prefix(self, datamodule) -> list:
        """The k demonstrations shown before every prompt: fixed examples of the train split."""
        pool = datamodule.conversations(self.few_shot["split"])
        k = int(self.few_shot["k"])
        if k > len(pool):
            raise TunelabError(f"eval.few_shot.k={k} but the {self.few_shot['split']} split has only {len(pool)} "
                               "examples with responses; lower k")
        return random.Random(self.few_shot["seed"]).sample(pool, k)

    def prompt_texts(self, datamodule, conversations: list, shots: list) -> list[str]:
        formatter = datamodule.formatter
        if not shots:
            return [formatter.generation_prompt(c.prompt) for c in conversations]
        if formatter.template == "chat":  # demonstrations as earlier turns of the same chat
            history = [m for s in shots for m in s.messages if m["role"] != "system"]
            texts = []
            for c in conversations:
                system = [m for m in c.prompt if m["role"] == "system"]
                turns = [m for m in c.prompt if m["role"] != "system"]
                texts.append(formatter.generation_prompt(system + history + turns))
            return texts
        demos = "".join(formatter.generation_prompt(s.prompt) + s.reference + "\n\n" for s in shots)
        return [demos + formatter.generation_prompt(c.prompt) for c in conversations]

    def predictions(self, model, datamodule, split: str | None = None, max_examples: int | None = None,
                    few_shot: bool = False, stream_to: Path | None = None) -> EvalResult:
        split = split or self.split
        if not self.metrics:
            return EvalResult()
        conversations = self.conversations(datamodule, split, max_examples or self.max_examples)
        if not conversations:
            return EvalResult()
        prompts = self.prompt_texts(datamodule, conversations, self.few_shot_prefix(datamodule) if few_shot else [])
        questions = [c.prompt[-1]["content"] for c in conversations]
        references = [c.reference for c in conversations]
        completions = generate_completions(
            model, datamodule.tokenizer, prompts, batch_size=self.batch_size, precision=self.precision,
            description=f"generating ({split})", on_batch=self.streamer(stream_to, questions, references),
            **self.generation)
        rows = [{"prompt": q, "reference": r, "prediction": c.text, "finished": c.finished, "new_tokens": c.new_tokens}
                for q, r, c in zip(questions, references, completions)]
        return self.score(rows, split)

    def score(self, rows: list[dict], split: str) -> EvalResult:
        """Apply every metric to generated rows (also usable on rows loaded from a file)."""
        predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
        context = {"prompts": [r["prompt"] for r in rows], "finished": [r.get("finished") for r in rows]}
        result = EvalResult(rows=rows)
        for name, metric in self.metrics.items():
            means, per_example = metric(predictions, references, **context)
            result.metrics.update({f"{split}/{k}": v for k, v in means.items()})
            for row, scores in zip(rows, per_example):
                row.update(scores)
            if hasattr(metric, "summarize"):
                result.summaries[name] = metric.summarize(rows)
        return result

    @staticmethod
    def streamer(path: Path | None, questions: list[str], references: list[str]):
        """Append each batch's generations to `path` as they come, so a crash later loses none of them."""
        if path is None:
            return None
        path.write_text("")

        def write(indices, completions):
            with path.open("a") as handle:
                for i, c in zip(indices, completions):
                    handle.write(json.dumps({"index": i, "prompt": questions[i], "reference": references[i],
                                             "prediction": c.text, "finished": c.finished}) + "\n")
        return write

    def run(self, model, datamodule, stream_to: Path | None = None) -> EvalResult:
        metrics = self.loss(model, datamodule)
        result = self.predictions(model, datamodule, stream_to=stream_to)
        result.metrics = {**metrics, **result.metrics}
        if self.harness is not None:  # standard benchmarks beside the task metrics, on the same model object
            scores, summary = self.harness(model, datamodule.tokenizer, self.precision)
            result.metrics |= scores
            result.summaries["harness"] = summary
        return result

    def run_few_shot(self, model, datamodule, stream_to: Path | None = None) -> EvalResult | None:
        """The prompting baseline: the (base) model with k train examples in every prompt; None when k=0."""
        if not int(self.few_shot["k"]):
            return None
        return self.predictions(model, datamodule, few_shot=True, stream_to=stream_to)

    def callbacks(self) -> list:
        """Generation metrics during training, every `during_training.every_n_epochs` epochs (0: never)."""
        if not int(self.during_training["every_n_epochs"]):
            return []
        from tunelab.eval.callback import GenerationMetrics

        return [GenerationMetrics(self, **self.during_training)]


def evaluate(evaluator, name: str, model, datamodule, run_dir: Path | None = None) -> EvalResult:
    """One model's evaluation, its generations streamed to run_dir/generations/NAME.jsonl as they come."""
    started = time.perf_counter()
    if not isinstance(evaluator, Evaluator) or run_dir is None:
        result = evaluator.run(model, datamodule)
    else:
        folder = run_dir / "generations"
        folder.mkdir(parents=True, exist_ok=True)
        run = evaluator.run_few_shot if name == "few_shot" else evaluator.run
        result = run(model, datamodule, stream_to=folder / f"{name}.jsonl")
    log.info("evaluated %s in %.1f s", name, time.perf_counter() - started)
    return result


def baseline_results(evaluator, model, datamodule, run_dir: Path, resuming: bool) -> dict[str, EvalResult]:
    """The base model (and the few-shot prompting baseline), or what a resumed run saved of them."""
    results = {}
    for name in ("base", "few_shot"):
        saved = run_dir / f"{name}_eval.json"
        if resuming and saved.is_file():
            results[name] = EvalResult.load(saved)
            continue
        if name == "few_shot" and not (isinstance(evaluator, Evaluator) and int(evaluator.few_shot["k"])):
            continue
        results[name] = evaluate(evaluator, name, model, datamodule, run_dir)
        results[name].save(saved)
    return results


def eval_callbacks(evaluator) -> list:
    return evaluator.callbacks() if hasattr(evaluator, "callbacks") else []
