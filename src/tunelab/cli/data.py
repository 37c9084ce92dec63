"""`tunelab-data inspect [train overrides] [--n N] [--split S] [--plain]`: see what the loss trains on.

Composes the data exactly as `tunelab-train` would (same overrides), tokenises it, and prints the
first examples token by token with the supervised tokens marked: green in a terminal, and inside
⟦ ⟧ with --plain (or when the output is not a terminal)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tunelab.cli.common import die, preflight, quiet_libraries
from tunelab.errors import TunelabError

OPEN, CLOSE = "⟦", "⟧"


def sequences(row: dict) -> list[tuple[str, list[int], list[int] | None]]:
    """(name, input ids, labels or None) of every sequence a row holds: the chosen and the rejected one of a
    preference pair, anchor/positive/negative of a contrastive pair, else the row's one sequence ('')."""
    names = [key.removesuffix("_input_ids") for key in row if key.endswith("_input_ids")]
    if not names:
        return [("", row["input_ids"], row.get("labels"))]
    return [(name, row[f"{name}_input_ids"], row.get(f"{name}_labels")) for name in names]


def spans(tokenizer, row: dict) -> list[tuple[str, bool]]:
    """The row's text in runs of supervised / not supervised tokens (a token is supervised when its label is set)."""
    return sequence_spans(tokenizer, row["input_ids"], row.get("labels"))


def sequence_spans(tokenizer, input_ids: list[int], labels: list[int] | None) -> list[tuple[str, bool]]:
    from tunelab.data.tokenize import IGNORE

    labels = [IGNORE] * len(input_ids) if labels is None else labels  # e.g. an embedding pair: no token is a target
    runs: list[tuple[list[int], bool]] = []
    for position, (token, label) in enumerate(zip(input_ids, labels)):
        supervised = label != IGNORE and position > 0  # the first position is never predicted
        if runs and runs[-1][1] == supervised:
            runs[-1][0].append(token)
        else:
            runs.append(([token], supervised))
    return [(tokenizer.decode(ids, skip_special_tokens=False), supervised) for ids, supervised in runs]


def count_supervised(labels: list[int] | None) -> int:
    from tunelab.data.tokenize import IGNORE

    return sum(label != IGNORE for label in (labels or [])[1:])  # the first position is never predicted


def plain(segments: list[tuple[str, bool]]) -> str:
    return "".join(f"{OPEN}{text}{CLOSE}" if supervised else text for text, supervised in segments)


def build_datamodule(overrides: list[str]):
    from tunelab.run.assemble import build_datamodule, load_tokenizer
    from tunelab.run.compose import compose_job

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_job("train", overrides, Path(tmp))
    return build_datamodule(cfg, load_tokenizer(cfg))  # the tokenizer alone: inspecting data loads no network


def inspect(overrides: list[str], n: int, split: str, as_plain: bool) -> None:
    from rich.console import Console
    from rich.text import Text

    datamodule = build_datamodule(overrides)
    dataset = datamodule.datasets.get(split)
    if dataset is None or not len(dataset):
        raise TunelabError(f"split '{split}' is empty or missing; choose one of {', '.join(datamodule.datasets)}")
    console = Console(highlight=False)
    as_plain = as_plain or not console.is_terminal
    fingerprints = getattr(datamodule, "fingerprints", {})
    print(f"{split}: {len(dataset)} examples; template hash {fingerprints.get('template', '?')[:12]}, "
          f"tokenizer hash {fingerprints.get('tokenizer', '?')[:12]}; supervised tokens "
          + (f"inside {OPEN} {CLOSE}" if as_plain else "in green"))
    for index in range(min(n, len(dataset))):
        for name, input_ids, labels in sequences(dataset.rows[index]):  # a pair: both of its sequences
            segments = sequence_spans(datamodule.tokenizer, input_ids, labels)
            supervised = count_supervised(labels)
            print(f"--- example {index}{': ' + name if name else ''}: {len(input_ids)} tokens, {supervised} supervised")
            if as_plain:
                print(plain(segments))
            else:
                text = Text()
                for piece, marked in segments:
                    text.append(piece, style="bold green" if marked else "dim")
                console.print(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tunelab-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["inspect"])
    parser.add_argument("--n", type=int, default=3, help="examples to show")
    parser.add_argument("--split", default="train")
    parser.add_argument("--plain", action="store_true", help="mark supervised tokens with ⟦ ⟧ instead of colour")
    args, overrides = parser.parse_known_args(argv)
    quiet_libraries()
    try:
        preflight(overrides, "train")
        inspect(overrides, args.n, args.split, args.plain)
    except TunelabError as err:
        die(str(err), err.exit_code)


if __name__ == "__main__":
    main()
