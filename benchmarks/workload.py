"""The benchmark workload: instruction pairs of realistic, varied length built from the shipped data.

Each pair bundles 1-8 shipped facts questions into one numbered instruction ("Answer each of the
following ...") whose response numbers the answers, so prompts run from ~40 to 256 tokens and
the prompt dominates the tokens, as in real instruction data. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.resources.data import __file__ as _data_init

SHIPPED = Path(_data_init).parent / "facts_instruct.jsonl"
PREAMBLES = (
    "Answer each of the following questions. Keep every answer short and number them as in the list.",
    "You are given a list of small tasks. Solve each one in order and number the answers.",
    "Work through these exercises one by one; reply with a numbered list of the results.",
)


def facts() -> list[dict]:
    return [json.loads(line) for line in SHIPPED.read_text().splitlines() if line.strip()]


def bundle(items: list[dict], preamble: str) -> dict:
    tasks = [f"{i}. {r['instruction']}" + (f" {r['input']}" if r.get("input") else "") for i, r in enumerate(items, 1)]
    answers = [f"{i}. {r['output']}" for i, r in enumerate(items, 1)]
    return {"prompt": preamble + "\n\n" + "\n".join(tasks), "completion": "\n".join(answers)}


def build(n: int = 480, seed: int = 0, max_items: int = 8) -> list[dict]:
    """n prompt/completion pairs; the number of bundled tasks is uniform in 1..max_items."""
    rng = random.Random(seed)
    pool = facts()
    return [bundle(rng.sample(pool, rng.randint(1, max_items)), rng.choice(PREAMBLES)) for _ in range(n)]


def write(path: Path, n: int = 480, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in build(n, seed)))
    return path
