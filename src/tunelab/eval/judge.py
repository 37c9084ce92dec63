"""LLM-as-judge: a model scores each prediction 1-5 against a rubric, with its reason kept.

The judge is a local HF model (the embedded one by default), an OpenAI-compatible endpoint when a
URL and key are given, or any callable `list[str] -> list[str | None]` passed as `client` (tests use
a deterministic fake). A reply with no clear 1-5 score is counted as unparseable, never scored, and a
request that fails is counted apart; neither stops the evaluation.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import urllib.error
import urllib.request

from tunelab.eval.metrics import mean, resolve_device

log = logging.getLogger(__name__)

DEFAULT_RUBRIC = (
    "You are grading an answer to a question against a reference answer.\n"
    "Question: {prompt}\nReference answer: {reference}\nAnswer to grade: {prediction}\n\n"
    "Rate the answer from 1 (wrong or unrelated) to 5 (correct and as complete as the reference). "
    "Reply exactly in the form:\nScore: <1-5>\nReason: <one sentence>"
)
LABELLED = re.compile(r"(?:score|rating|grade)\s*(?:is|of|=|:|-)?\s*[*_`\"']*\s*(-?\d+(?:\.\d+)?)", re.I)
LEADING = re.compile(r"^\W*(\d+(?:\.\d+)?)\s*(?:/\s*5|out of 5)?\b", re.I)
OUT_OF_FIVE = re.compile(r"\b(\d+(?:\.\d+)?)\s*(?:/|out of)\s*5\b", re.I)
REASON = re.compile(r"reason(?:ing)?\s*[:\-]\s*(.+)", re.I | re.S)


def parse_score(reply: str | None) -> tuple[int | None, str]:
    """(score 1-5 or None, reason). Labelled scores win; several different ones are ambiguous."""
    if reply is None or not reply.strip():
        return None, "empty reply"
    text = reply.strip()
    found = REASON.search(text)
    reason = (found.group(1) if found else text).strip()[:500]
    labelled = {float(v) for v in LABELLED.findall(text)}
    if len(labelled) > 1:
        return None, f"ambiguous: several scores {sorted(labelled)} in {text[:200]!r}"
    candidates = labelled or {float(m.group(1)) for m in (LEADING.match(text), OUT_OF_FIVE.search(text)) if m}
    if len(candidates) != 1:
        return None, f"no score in {text[:200]!r}"
    value = candidates.pop()
    if value != int(value) or not 1 <= value <= 5:
        return None, f"score {value:g} is not an integer from 1 to 5 in {text[:200]!r}"
    return int(value), reason


@functools.lru_cache(maxsize=1)
def local_judge_model(name_or_path: str):
    from tunelab.models.loading import load_pretrained

    return load_pretrained(name_or_path)


class LocalJudge:
    """Replies from a local causal LM, through its chat template, greedy, on `device` (auto: the GPU if any),
    sampled by the generation engine `engine` (hf; null: the run's, see conf/eval/judge.yaml)."""

    def __init__(self, model: str, max_new_tokens: int = 64, batch_size: int = 8, precision: str | None = "auto",
                 device: str | None = "auto", engine: str | None = "hf"):
        self.model, self.max_new_tokens, self.batch_size, self.precision = model, max_new_tokens, batch_size, precision
        self.device, self.engine, self.engines = device, engine, {}

    def __call__(self, prompts: list[str]) -> list[str | None]:
        from tunelab.core.generation import build_engine, generate

        model, tokenizer = local_judge_model(self.model)
        model.to(resolve_device(self.device))
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        if self.engine and self.engine not in self.engines:  # built once (a vLLM server stays up between calls)
            self.engines[self.engine] = build_engine({"engine": self.engine})
        engine = self.engines.get(self.engine)  # None: the run's active engine
        return generate(model, tokenizer, texts, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                        precision=self.precision, description="judging", do_sample=False, engine=engine)


class EndpointJudge:
    """Replies from an OpenAI-compatible `/chat/completions` endpoint; a failed request gives None."""

    def __init__(self, url: str, api_key: str, model: str, max_new_tokens: int = 64, timeout: float = 30.0):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.api_key, self.model, self.max_new_tokens, self.timeout = api_key, model, max_new_tokens, timeout
        self.errors: list[str] = []

    def ask(self, prompt: str) -> str | None:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": self.max_new_tokens}).encode()
        request = urllib.request.Request(self.url, data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
            self.errors.append(f"{type(err).__name__}: {err}")
            return None

    def __call__(self, prompts: list[str]) -> list[str | None]:
        replies = [self.ask(p) for p in prompts]
        if self.errors:
            log.warning("judge endpoint %s: %d of %d requests failed (first: %s)", self.url, len(self.errors),
                        len(prompts), self.errors[0])
        return replies


class LLMJudge:
    def __init__(self, model: str = "embedded:smollm2-135m-instruct", url: str | None = None,
                 api_key: str | None = None, endpoint_model: str | None = None, rubric: str = DEFAULT_RUBRIC,
                 max_new_tokens: int = 64, batch_size: int = 8, precision: str | None = "auto",
                 timeout: float = 30.0, client=None, name: str = "judge", examples_per_category: int = 3,
                 device: str | None = "auto", engine: str | None = "hf"):
        for field in ("{prediction}",):
            if field not in rubric:
                from tunelab.errors import TunelabError

                raise TunelabError(f"the judge rubric must contain {field} (and may use {{prompt}}, {{reference}})")
        self.rubric, self.name, self.examples_per_category = rubric, name, examples_per_category
        if client is not None:
            self.client = client
        elif url and api_key:
            self.client = EndpointJudge(url, api_key, endpoint_model or model, max_new_tokens, timeout)
        else:
            self.client = LocalJudge(model, max_new_tokens, batch_size, precision, device, engine)

    def __call__(self, predictions: list[str], references: list[str], prompts: list[str] | None = None, **context):
        prompts = prompts or [""] * len(predictions)
        asks = [self.rubric.format(prompt=p, reference=r, prediction=o) for p, r, o in zip(prompts, references, predictions)]
        replies = list(self.client(asks))
        per_example = []
        for reply in replies:
            score, reason = parse_score(reply)
            status = "failed" if reply is None else ("scored" if score is not None else "unparseable")
            per_example.append({f"{self.name}_score": score, f"{self.name}_reason": reason,
                                f"{self.name}_reply": reply, f"{self.name}_status": status})
        statuses = [e[f"{self.name}_status"] for e in per_example]
        means = {f"{self.name}_score": mean(e[f"{self.name}_score"] for e in per_example),
                 f"{self.name}/unparseable": float(statuses.count("unparseable")),
                 f"{self.name}/failed": float(statuses.count("failed"))}
        return means, per_example

    def summarize(self, rows: list[dict]) -> dict:
        summary = {"scored": sum(r.get(f"{self.name}_status") == "scored" for r in rows)}
        for status in ("unparseable", "failed"):
            hits = [r for r in rows if r.get(f"{self.name}_status") == status]
            summary[status] = {"count": len(hits), "rate": len(hits) / max(len(rows), 1),
                               "examples": [{"prompt": r["prompt"], "prediction": r["prediction"],
                                             "reason": r.get(f"{self.name}_reply") or r.get(f"{self.name}_reason")}
                                            for r in hits[: self.examples_per_category]]}
        return summary
