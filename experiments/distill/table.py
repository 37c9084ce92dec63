"""The study's table from its two run dirs: python experiments/distill/table.py OUT (OUT/teacher, OUT/student)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("test/correct", "test/format", "test/response_words", "test/eos_fraction")


def row(name: str, metrics: dict) -> str:
    return f"| {name} | " + " | ".join(f"{metrics[m]:.3f}" if m in metrics else "-" for m in METRICS) + " |"


def main(out: Path) -> None:
    teacher, student = (json.loads((out / name / "metrics.json").read_text()) for name in ("teacher", "student"))
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|",
             row("student before (the base model)", student["base"]),
             row("student after distillation", student["tuned"]),
             row("teacher (SFT)", teacher["tuned"])]
    train = student["train"]
    lines += ["", f"student: {train['global_step']} updates, {train.get('generated_tokens', 0)} sampled tokens, "
                  f"{train['fit_seconds']:.0f} s fit, peak {train['peak_memory_mb']:.0f} MB"]
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/distill"))
