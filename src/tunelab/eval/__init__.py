"""Evaluation: loss/perplexity, generation metrics and base-vs-tuned comparison."""

from tunelab.eval.evaluator import Evaluator
from tunelab.eval.metrics import Rouge

__all__ = ["Evaluator", "Rouge"]
