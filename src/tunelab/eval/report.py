"""Base-vs-tuned tables for the terminal and the run dir."""

from __future__ import annotations

import json
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

LOWER_IS_BETTER = ("loss", "perplexity")


def comparison(base: dict, tuned: dict) -> dict:
    return {k: tuned[k] - base[k] for k in tuned if k in base}


def print_comparison(base: dict, tuned: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("metric", "base", "tuned", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, value in tuned.items():
        if key not in base:
            table.add_row(key, "-", f"{value:.4f}", "")
            continue
        delta = value - base[key]
        better = delta < 0 if key.endswith(LOWER_IS_BETTER) else delta > 0
        colour = "green" if better else "red"
        table.add_row(key, f"{base[key]:.4f}", f"{value:.4f}", f"[{colour}]{delta:+.4f}[/{colour}]")
    Console().print(table)


@rank_zero_only
def write_predictions(path: Path, base_rows: list[dict], tuned_rows: list[dict]) -> None:
    """One line per example: prompt, reference, and each model's output and scores side by side."""
    if not tuned_rows:
        return
    with path.open("w") as handle:
        for i, tuned in enumerate(tuned_rows):
            row = {"prompt": tuned["prompt"], "reference": tuned["reference"]}
            row["tuned"] = {k: v for k, v in tuned.items() if k not in row}
            if i < len(base_rows):
                row["base"] = {k: v for k, v in base_rows[i].items() if k not in row}
            handle.write(json.dumps(row) + "\n")
