"""`tunelab-verify`: short paired trainings that must agree, each with a measured difference."""

from tunelab.verify.pairs import PAIRS, PairResult, run_pairs

__all__ = ["PAIRS", "PairResult", "run_pairs"]
