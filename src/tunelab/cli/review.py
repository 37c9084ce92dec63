"""`tunelab-review`: blind A/B human review of two models' answers.

    tunelab-review export RUN_DIR          write review_sheet.csv (+ review_key.json) from predictions.jsonl
    tunelab-review score SHEET.csv         read the filled sheet back: win rate of tuned over base
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunelab.cli.common import die
from tunelab.errors import TunelabError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tunelab-review", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a blind A/B sheet from a run dir's predictions.jsonl")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, default=None, help="folder for the sheet and key (default: the run dir)")
    export.add_argument("--a", default="base", help="first model (base, few_shot, tuned)")
    export.add_argument("--b", default="tuned", help="second model")
    export.add_argument("--seed", type=int, default=0, help="the random order of the two answers")
    score = commands.add_parser("score", help="win rate from a filled sheet (preference: 1, 2 or tie)")
    score.add_argument("sheet", type=Path)
    score.add_argument("--key", type=Path, default=None, help="the key written with the sheet (default: beside it)")
    score.add_argument("--model", default=None, help="whose win rate (default: the second model, usually tuned)")
    score.add_argument("--json", action="store_true", help="print JSON instead of a sentence")
    return parser.parse_args(argv)


def results_from_predictions(run_dir: Path) -> dict:
    from tunelab.eval.result import EvalResult

    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        raise TunelabError(f"{path} does not exist; give a finished run dir (or a tunelab-evaluate output dir)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = [k for k in (records[0] if records else {}) if k not in ("prompt", "reference")]
    return {name: EvalResult(rows=[{"prompt": r["prompt"], "reference": r["reference"], **r[name]}
                                   for r in records if name in r]) for name in names}


def export(args: argparse.Namespace) -> None:
    from tunelab.eval.review import export_sheet

    results = results_from_predictions(args.run_dir)
    for name in (args.a, args.b):
        if name not in results:
            raise TunelabError(f"{args.run_dir}/predictions.jsonl has no '{name}' outputs; it has {sorted(results)}")
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    sheet = export_sheet(out, results, seed=args.seed, a=args.a, b=args.b)
    print(f"wrote {sheet} ({len(results[args.a].rows)} rows) and its key {out / 'review_key.json'}; "
          "fill the preference column with 1, 2 or tie")


def score(args: argparse.Namespace) -> dict:
    from tunelab.eval.review import KEY, read_preferences, win_rate

    key_file = args.key or args.sheet.with_name(KEY)
    counts = read_preferences(args.sheet, key_file)
    a, b = json.loads(key_file.read_text())["models"]
    model = args.model or b
    if model not in (a, b):
        raise TunelabError(f"--model {model} is not in this sheet; it compares {a} and {b}")
    result = win_rate(counts, model, a if model == b else b)
    if not result["judged"]:  # nothing to rate yet: say what is missing, not "nan% over 0"
        rows = result["blank"] + result["invalid"]
        unreadable = f", {result['invalid']} unreadable" if result["invalid"] else ""
        raise TunelabError(f"{args.sheet}: no row is judged yet ({result['blank']} of {rows} blank{unreadable}); "
                           "fill the preference column with 1, 2 or tie, then score it again")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{model} vs {result['against']}: win rate {result['win_rate']:.1%} over {result['judged']} judged "
              f"({result['wins']} wins, {result['losses']} losses, {result['ties']} ties; "
              f"{result['blank'] + result['invalid']} unjudged: {result['blank']} blank, {result['invalid']} unreadable)")
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        export(args) if args.command == "export" else score(args)
    except TunelabError as err:
        die(str(err), err.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
