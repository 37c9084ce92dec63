#!/usr/bin/env python3
"""Generate the verifiable arithmetic task that ships inside tunelab (GRPO/RLOO's default data).

Writes ``src/tunelab/resources/data/arithmetic.jsonl``: short questions with a number answer, as
preference records ``{"prompt", "chosen", "rejected"}``: ``chosen`` states the right number (the
reference the numeric reward checks), ``rejected`` a wrong one (for DPO and reward models on the same
task). SFT reads the same file with ``chosen`` as the completion (conf/data/arithmetic_sft.yaml), so
every method of a comparison sees the same records and, with the same ``data.split_seed``, the same
train/val/test split.

Standard library only and deterministic (fixed seed, no set iteration): two runs are byte-identical.

    python scripts/make_arithmetic.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261126
PER_OPERATION = 400

PHRASINGS = {
    "+": ["What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?", "Add {a} and {b}."],
    "-": ["What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}."],
    "*": ["What is {a} * {b}?", "Compute {a} x {b}.", "What is {a} times {b}?", "Multiply {a} by {b}."],
}
SUFFIX = " Answer with the number."


def operands(rng: random.Random, op: str) -> tuple[int, int]:
    """Small enough for a 135M model to get some right (so a group has signal), large enough to miss some."""
    if op == "+":
        return rng.randint(10, 99), rng.randint(10, 99)
    if op == "-":
        a = rng.randint(20, 99)
        return a, rng.randint(1, a)
    return rng.randint(2, 12), rng.randint(2, 12)


def answer(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def wrong(rng: random.Random, right: int) -> int:
    """A near miss (off by 1-10), never the right number nor negative."""
    while True:
        candidate = right + rng.choice([-1, 1]) * rng.randint(1, 10)
        if candidate != right and candidate >= 0:
            return candidate


def build(rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    for op in ("+", "-", "*"):
        count = 0
        while count < PER_OPERATION:
            a, b = operands(rng, op)
            phrasing = rng.choice(PHRASINGS[op])
            question = phrasing.format(a=a, b=b) + SUFFIX
            if question in seen:
                continue
            seen.add(question)
            right = answer(a, b, op)
            rows.append({"prompt": question, "chosen": f"The answer is {right}.",
                         "rejected": f"The answer is {wrong(rng, right)}."})
            count += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    default_out = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "resources" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    rows = build(random.Random(SEED))
    path = args.out / "arithmetic.jsonl"
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
