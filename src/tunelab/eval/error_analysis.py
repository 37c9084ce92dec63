"""Error analysis: tag every prediction with the failure categories that apply, and summarise them.

Categories: empty, too_long (word-length ratio to the reference above a threshold), repetitive
(share of repeated word n-grams), truncated (no end-of-turn before max_new_tokens), off_topic (low
semantic similarity to the reference) and misspelled (words in no dictionary of pyspellchecker's
bundled word list that appear in neither the prompt nor the reference, so names are not flagged).
"""

from __future__ import annotations

import functools
import re

from tunelab.eval.metrics import cosine_similarities

CATEGORIES = ("empty", "too_long", "repetitive", "truncated", "off_topic", "misspelled")
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@functools.lru_cache(maxsize=2)
def spell_checker(language: str):
    from spellchecker import SpellChecker

    return SpellChecker(language=language)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def repeated_ngram_rate(text: str, n: int) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for varied text, near 1 for a loop."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class ErrorAnalysis:
    def __init__(self, max_length_ratio: float = 3.0, repetition_ngram: int = 3, repetition_threshold: float = 0.3,
                 off_topic_threshold: float = 0.3, similarity_model: str | None = None, language: str = "en",
                 min_word_length: int = 3, examples_per_category: int = 3, categories: list[str] | None = None):
        self.max_length_ratio = max_length_ratio
        self.repetition_ngram, self.repetition_threshold = repetition_ngram, repetition_threshold
        self.off_topic_threshold, self.similarity_model = off_topic_threshold, similarity_model
        self.language, self.min_word_length = language, min_word_length
        self.examples_per_category = examples_per_category
        self.categories = tuple(categories or CATEGORIES)
        unknown = set(self.categories) - set(CATEGORIES)
        if unknown:
            from tunelab.errors import TunelabError

            raise TunelabError(f"unknown error categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")

    def misspelled(self, prediction: str, context: str) -> list[str]:
        known_here = set(words(context))
        candidates = {w for w in words(prediction) if len(w) >= self.min_word_length and w not in known_here}
        return sorted(spell_checker(self.language).unknown(candidates)) if candidates else []

    def tags(self, prediction: str, reference: str, prompt: str, finished: bool | None, similarity: float | None):
        """The categories that apply to one prediction, and the misspelled words found."""
        if not prediction.strip():
            return ["empty"] + (["truncated"] if finished is False else []), []
        found = []
        if len(words(prediction)) > self.max_length_ratio * max(len(words(reference)), 1):
            found.append("too_long")
        if repeated_ngram_rate(prediction, self.repetition_ngram) > self.repetition_threshold:
            found.append("repetitive")
        if finished is False:
            found.append("truncated")
        if similarity is not None and similarity < self.off_topic_threshold:
            found.append("off_topic")
        typos = self.misspelled(prediction, f"{prompt} {reference}") if "misspelled" in self.categories else []
        if typos:
            found.append("misspelled")
        return [t for t in found if t in self.categories], typos

    def __call__(self, predictions: list[str], references: list[str], prompts: list[str] | None = None,
                 finished: list[bool] | None = None, **context):
        prompts = prompts or [""] * len(predictions)
        finished = finished or [None] * len(predictions)
        similarities = (cosine_similarities(predictions, references, self.similarity_model)
                        if "off_topic" in self.categories else [None] * len(predictions))
        per_example = []
        for pred, ref, prompt, done, sim in zip(predictions, references, prompts, finished, similarities):
            tags, typos = self.tags(pred, ref, prompt, done, sim)
            per_example.append({"errors": tags, "misspelled_words": typos})
        means = {f"errors/{c}": sum(c in e["errors"] for e in per_example) / max(len(per_example), 1)
                 for c in self.categories}
        return means, per_example

    def summarize(self, rows: list[dict]) -> dict:
        """Per category: count, rate and a few examples (prompt, reference, prediction)."""
        summary = {}
        for category in self.categories:
            hits = [r for r in rows if category in r.get("errors", ())]
            examples = [{k: r.get(k) for k in ("prompt", "reference", "prediction")} for r in hits]
            if category == "misspelled":
                for example, row in zip(examples, hits):
                    example["words"] = row.get("misspelled_words", [])
            summary[category] = {"count": len(hits), "rate": len(hits) / max(len(rows), 1),
                                 "examples": examples[: self.examples_per_category]}
        return summary
