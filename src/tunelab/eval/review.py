"""Human review: a blind A/B sheet (two models' answers in random order, CSV) and its win rate.

The sheet never names the models; which response came from which lives in a key file beside it.
Reviewers fill the `preference` column with 1, 2 or tie (anything else, or blank, is counted apart).
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

from tunelab.errors import TunelabError

SHEET, KEY = "review_sheet.csv", "review_key.json"
COLUMNS = ("id", "prompt", "reference", "response_1", "response_2", "preference", "notes")


def export_sheet(out_dir: Path, results: dict, seed: int = 0, a: str = "base", b: str = "tuned") -> Path | None:
    """Write the sheet and its key for models `a` and `b`; None when either has no generations."""
    if results.get(a) is None or results.get(b) is None or not results[a].rows or not results[b].rows:
        return None
    if any("prediction" not in row for row in results[a].rows + results[b].rows):
        return None  # not text generations (e.g. a reward model's scores): nothing to read side by side
    rng = random.Random(seed)
    key = {}
    with (out_dir / SHEET).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for i, (row_a, row_b) in enumerate(zip(results[a].rows, results[b].rows)):
            order = [a, b] if rng.random() < 0.5 else [b, a]
            outputs = {a: row_a["prediction"], b: row_b["prediction"]}
            writer.writerow([i, row_a["prompt"], row_a["reference"], outputs[order[0]], outputs[order[1]], "", ""])
            key[str(i)] = {"1": order[0], "2": order[1]}
    (out_dir / KEY).write_text(json.dumps({"models": [a, b], "order": key}, indent=1) + "\n")
    return out_dir / SHEET


def read_preferences(sheet: Path, key_file: Path) -> Counter:
    """How often each model won, ties, and sheets rows left blank or filled with something else."""
    if not sheet.is_file():
        raise TunelabError(f"review sheet {sheet} does not exist; export one with `tunelab-review export RUN_DIR`")
    if not key_file.is_file():
        raise TunelabError(f"the key {key_file} for the sheet is missing; pass --key PATH to the {KEY} written with it")
    key = json.loads(key_file.read_text())
    counts = Counter({m: 0 for m in key["models"]} | {"tie": 0, "blank": 0, "invalid": 0})
    with sheet.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"id", "preference"} - set(reader.fieldnames or ())
        if missing:
            raise TunelabError(f"{sheet} lacks the columns {sorted(missing)}; fill the sheet as exported")
        for row in reader:
            answer = (row["preference"] or "").strip().lower()
            order = key["order"].get(str(row["id"]).strip())
            if not answer:
                counts["blank"] += 1
            elif order is None:
                counts["invalid"] += 1
            elif answer in ("1", "2", "a", "b"):
                counts[order[{"a": "1", "b": "2"}.get(answer, answer)]] += 1
            elif answer in ("tie", "t", "=", "0", "both", "neither"):
                counts["tie"] += 1
            else:
                counts["invalid"] += 1
    return counts


def win_rate(counts: Counter, model: str, other: str) -> dict:
    """`model`'s win rate over judged rows (a tie counts half), with the raw counts; None before any row is judged."""
    judged = counts[model] + counts[other] + counts["tie"]
    rate = (counts[model] + 0.5 * counts["tie"]) / judged if judged else None
    return {"model": model, "against": other, "wins": counts[model], "losses": counts[other], "ties": counts["tie"],
            "blank": counts["blank"], "invalid": counts["invalid"], "judged": judged, "win_rate": rate}
