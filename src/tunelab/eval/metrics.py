"""Generation metrics: each a callable (predictions, references) -> (means, per-example scores)."""

from __future__ import annotations


class Rouge:
    """ROUGE F-measures from rouge-score (stemmed), averaged over examples."""

    def __init__(self, rouge_types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL"), use_stemmer: bool = True):
        from rouge_score import rouge_scorer

        self.rouge_types = tuple(rouge_types)
        self.scorer = rouge_scorer.RougeScorer(list(self.rouge_types), use_stemmer=use_stemmer)

    def __call__(self, predictions: list[str], references: list[str]):
        per_example = [
            {name: score.fmeasure for name, score in self.scorer.score(ref, pred).items()}
            for pred, ref in zip(predictions, references)
        ]
        means = {name: sum(s[name] for s in per_example) / max(len(per_example), 1) for name in self.rouge_types}
        return means, per_example
