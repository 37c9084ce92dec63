"""The Pareto front of a search with several objectives (`optimized_metric: [a, b]`, `hydra.sweeper.direction:
[minimize, minimize]`): the finished runs no other finished run beats on every objective at once."""

from __future__ import annotations

import math

import yaml

from tunelab.report.runs import FINISHED, Run


def objectives_of(runs: list[Run]) -> dict[str, str]:
    """{metric: direction} of the search the runs belong to; empty when it optimized one metric (or none)."""
    for run in runs:
        names = run.config.get("optimized_metric")
        hydra_file = run.path / ".hydra" / "hydra.yaml"
        if not isinstance(names, list) or len(names) < 2 or not hydra_file.is_file():
            continue
        directions = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("sweeper", {}).get("direction")
        if isinstance(directions, list) and len(directions) == len(names):
            return dict(zip(names, directions))
    return {}


def dominates(a: list[float], b: list[float], signs: list[int]) -> bool:
    """a is at least as good as b on every objective and better on one (signs: +1 minimize, -1 maximize)."""
    pairs = [(s * x, s * y) for x, y, s in zip(a, b, signs)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_front(runs: list[Run], objectives: dict[str, str]) -> list[Run]:
    signs = [1 if d == "minimize" else -1 for d in objectives.values()]
    points = {run.name: [float(run.metrics.get(m, math.nan)) for m in objectives] for run in runs
              if run.status == FINISHED}
    points = {name: p for name, p in points.items() if all(map(math.isfinite, p))}
    front = [name for name, p in points.items() if not any(dominates(q, p, signs) for q in points.values())]
    return [run for run in runs if run.name in front]


def front_section(runs: list[Run], labels: dict[str, str]) -> str:
    """Markdown: the front, best on the first objective first; empty when the runs optimized one metric."""
    objectives = objectives_of(runs)
    if not objectives:
        return ""
    first, sign = next(iter(objectives)), 1 if next(iter(objectives.values())) == "minimize" else -1
    front = sorted(pareto_front(runs, objectives), key=lambda r: sign * float(r.metrics[first]))
    header = ["run", *(f"{m} ({d})" for m, d in objectives.items()), "dir"]
    rows = [[labels.get(r.name, r.name), *(f"{float(r.metrics[m]):.4g}" for m in objectives), f"`{r.name}`"] for r in front]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return (f"\n## Pareto front\n\n{len(front)} of the finished runs are not beaten on every objective at once by "
            f"another run:\n\n" + "\n".join(lines) + "\n")
