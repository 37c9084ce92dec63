"""Generation metrics, each a callable `(predictions, references, **context) -> (means, per_example)`.

`context` carries what some metrics need beside the texts: `prompts` (the user turn) and `finished`
(whether generation stopped at an end-of-turn token). Metrics that need neither ignore it, so any
callable with the two-argument shape is a metric too.
"""

from __future__ import annotations

import functools
import re
import string

from tunelab.errors import TunelabError


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


class Rouge:
    """ROUGE F-measures from rouge-score (stemmed), averaged over examples."""

    def __init__(self, rouge_types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL"), use_stemmer: bool = True):
        from rouge_score import rouge_scorer

        self.rouge_types = tuple(rouge_types)
        self.scorer = rouge_scorer.RougeScorer(list(self.rouge_types), use_stemmer=use_stemmer)

    def __call__(self, predictions: list[str], references: list[str], **context):
        per_example = [
            {name: float(score.fmeasure) for name, score in self.scorer.score(ref, pred).items()}
            for pred, ref in zip(predictions, references)
        ]
        means = {name: mean(s[name] for s in per_example) for name in self.rouge_types}
        return means, per_example


ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


class ExactMatch:
    """`exact_match`: identical after stripping outer whitespace; `normalized_match`: identical after
    SQuAD normalisation (case, punctuation, articles, spacing)."""

    def __call__(self, predictions: list[str], references: list[str], **context):
        per_example = [
            {"exact_match": float(p.strip() == r.strip()),
             "normalized_match": float(normalize_answer(p) == normalize_answer(r))}
            for p, r in zip(predictions, references)
        ]
        return {k: mean(s[k] for s in per_example) for k in ("exact_match", "normalized_match")}, per_example


def resolve_device(device: str | None) -> str:
    """`auto` (or null): the GPU when one is visible, where the evaluated model runs too; else the CPU."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@functools.lru_cache(maxsize=4)
def sentence_encoder(model_path: str | None, device: str = "cpu"):
    """Loaded once per process: base, few-shot and tuned evaluations (and error analysis) share it."""
    from sentence_transformers import SentenceTransformer

    from tunelab.models.sentence import default_embedding_model

    path = model_path or default_embedding_model()
    try:
        return SentenceTransformer(path, device=device)
    except (OSError, ValueError) as err:
        raise TunelabError(f"cannot load a sentence-transformers model from '{path}' ({err}); "
                           "point model_path at a local sentence-transformers folder") from err


_LAST_SIMILARITIES: dict = {}


def cosine_similarities(predictions: list[str], references: list[str], model_path: str | None = None,
                        device: str | None = "auto", batch_size: int = 64) -> list[float]:
    """Cosine similarity of each prediction with its reference; an empty prediction scores 0.

    The last answer is remembered, so semantic similarity and error analysis (off-topic) of the same
    outputs encode them once."""
    if not predictions:
        return []
    device = resolve_device(device)
    key = (model_path, device, tuple(predictions), tuple(references))
    if key not in _LAST_SIMILARITIES:
        _LAST_SIMILARITIES.clear()
        _LAST_SIMILARITIES[key] = encode_similarities(predictions, references, model_path, device, batch_size)
    return list(_LAST_SIMILARITIES[key])


def encode_similarities(predictions, references, model_path, device, batch_size) -> list[float]:
    encoder = sentence_encoder(model_path, device)
    embeddings = encoder.encode(list(predictions) + list(references), batch_size=batch_size,
                                convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    pred, ref = embeddings[: len(predictions)], embeddings[len(predictions) :]
    scores = (pred * ref).sum(-1).clamp(-1.0, 1.0).tolist()
    return [0.0 if not p.strip() else float(s) for p, s in zip(predictions, scores)]


class SemanticSimilarity:
    """Cosine similarity of sentence embeddings of prediction and reference (1 = same meaning)."""

    def __init__(self, model_path: str | None = None, device: str | None = "auto", batch_size: int = 64,
                 name: str = "semantic_similarity"):
        self.model_path, self.device, self.batch_size, self.name = model_path, device, batch_size, name

    def __call__(self, predictions: list[str], references: list[str], **context):
        scores = cosine_similarities(predictions, references, self.model_path, self.device, self.batch_size)
        return {self.name: mean(scores)}, [{self.name: s} for s in scores]
