"""Evaluation: loss/perplexity, generation metrics, error analysis, LLM judge, base-vs-tuned reports."""

from tunelab.eval.error_analysis import ErrorAnalysis
from tunelab.eval.evaluator import EvalResult, Evaluator
from tunelab.eval.judge import LLMJudge, parse_score
from tunelab.eval.metrics import ExactMatch, Rouge, SemanticSimilarity

__all__ = ["ErrorAnalysis", "EvalResult", "Evaluator", "ExactMatch", "LLMJudge", "Rouge", "SemanticSimilarity",
           "parse_score"]
