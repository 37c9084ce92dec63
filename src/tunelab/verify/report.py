"""The pass/fail table of a verify run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tunelab.verify.pairs import FAIL, PASS, PairResult

STYLE = {PASS: "green", FAIL: "bold red"}


def fmt(values: dict[str, float]) -> str:
    return "\n".join(f"{k} {v:.2e}" for k, v in values.items()) or "-"


def results_table(results: list[PairResult], title: str = "tunelab-verify") -> Table:
    table = Table(title=title, show_lines=True)
    for column in ("pair", "result", "measured gap", "tolerance", "note"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.name, f"[{STYLE.get(r.status, 'yellow')}]{r.status}[/]", fmt(r.measured), fmt(r.tolerance), r.note)
    return table


def print_results(results: list[PairResult], console: Console | None = None) -> None:
    (console or Console()).print(results_table(results))
