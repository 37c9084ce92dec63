"""Build the local lm-eval tasks from the shipped facts: byte-identical output on every run, stdlib only.

    python scripts/make_harness_tasks.py     # writes src/tunelab/resources/harness/*.jsonl

The facts answers are parsed out of facts_instruct.jsonl's fixed output formats, so the tasks ask exactly
what the facts data teaches (see src/tunelab/resources/harness/README.md for what that means for a score).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "src/tunelab/resources/data/facts_instruct.jsonl"
OUT = ROOT / "src/tunelab/resources/harness"
SEED = 20261125
CHOICES = 4             # one right answer and three distractors of the same kind
MC_PER_KIND = 50        # 4 kinds -> at most 200 multiple-choice questions
GEN_TEST, GEN_TRAIN = 80, 8   # exact-match questions; train holds the few-shot demonstrations

# kind: (pattern of facts_instruct's output, question asked about the subject)
KINDS = {
    "capital": (r"^The capital of (.+) is (.+)\.$", "What is the capital of {}?"),
    "continent": (r"^(.+) is in (.+)\.$", "Which continent is {} in?"),
    "symbol": (r"^The chemical symbol for (.+) is (\w+)\.$", "What is the chemical symbol for {}?"),
    "antonym": (r"^The opposite of (.+) is (.+)\.$", "What is the opposite of {}?"),
}
# The generation task's reference is the whole sentence in facts_instruct's format, the form the facts data
# teaches and in which SmolLM2-Instruct already answers ("The capital of Gabon is Libreville.").
GEN_SENTENCES = {"capital": "The capital of {} is {}.", "symbol": "The chemical symbol for {} is {}."}


def facts_by_kind() -> dict[str, dict[str, str]]:
    """{kind: {subject: answer}} in first-seen order, from every facts_instruct record that states one."""
    found = {kind: {} for kind in KINDS}
    for line in FACTS.read_text().splitlines():
        output = json.loads(line)["output"]
        for kind, (pattern, _) in KINDS.items():
            match = re.match(pattern, output)
            if match:
                found[kind].setdefault(match.group(1), match.group(2))
                break
    return found


def multiple_choice(rng: random.Random, facts: dict) -> list[dict]:
    rows = []
    for kind, pairs in facts.items():
        answers = sorted(set(pairs.values()))
        for subject in sorted(pairs)[:MC_PER_KIND]:
            right = pairs[subject]
            choices = rng.sample([a for a in answers if a != right], CHOICES - 1) + [right]
            rng.shuffle(choices)
            rows.append({"kind": kind, "question": KINDS[kind][1].format(subject), "choices": choices,
                         "answer": choices.index(right)})
    rng.shuffle(rows)
    return rows


def generation(rng: random.Random, facts: dict) -> list[dict]:
    rows = [{"kind": kind, "question": KINDS[kind][1].format(subject), "answer": sentence.format(subject, answer)}
            for kind, sentence in GEN_SENTENCES.items() for subject, answer in sorted(facts[kind].items())]
    rng.shuffle(rows)
    return rows[: GEN_TEST + GEN_TRAIN]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(SEED)
    facts = facts_by_kind()
    write_jsonl(OUT / "facts_mc.jsonl", multiple_choice(rng, facts))
    gen = generation(rng, facts)
    write_jsonl(OUT / "facts_gen_test.jsonl", gen[:GEN_TEST])
    write_jsonl(OUT / "facts_gen_train.jsonl", gen[GEN_TEST:])
    print(f"wrote {OUT}: {sum(1 for _ in (OUT / 'facts_mc.jsonl').open())} multiple-choice, "
          f"{GEN_TEST} + {GEN_TRAIN} generation rows")


if __name__ == "__main__":
    main()
