"""What one evaluation of one model gives, the same shape from every evaluator (text metrics, preference
accuracy, retrieval, rewards), so training, tunelab-evaluate and the reports read one thing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EvalResult:
    """What one model scored: mean metrics, one row per generated example, and summaries
    (error categories with examples, judge failures) keyed by the metric's name."""

    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    summaries: dict[str, dict] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"metrics": self.metrics, "rows": self.rows, "summaries": self.summaries},
                                   default=float) + "\n")

    @classmethod
    def load(cls, path: Path) -> EvalResult:
        return cls(**json.loads(path.read_text()))
