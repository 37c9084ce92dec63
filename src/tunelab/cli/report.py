"""`tunelab-report DIR...`: compare finished, failed and incomplete runs; markdown + PNG plots."""

from __future__ import annotations

import argparse
import sys

from tunelab.cli.common import die, quiet_libraries
from tunelab.errors import TunelabError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunelab-report",
        description="Read run dirs (resolved config, overrides, metrics.json, CSV logs), group them by the "
                    "overrides that differ, average over seeds, and write report.md with PNG plots.",
        epilog="examples:\n  tunelab-report outputs/full_vs_lora\n"
               "  tunelab-report outputs/default/multirun/2026-01-01_10-00-00-000000 --out report/\n"
               "  tunelab-report runA runB --metric tuned/test/rougeL --seed-key seed",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="run dirs, or folders that contain them (a multirun, a study)")
    p.add_argument("--out", help="where report.md and the plots go (default: <first DIR>/report)")
    p.add_argument("--metric", action="append", dest="metrics", help="a metrics.json key to show (repeatable), "
                   "e.g. tuned/test/rougeL; the usual ones are shown anyway")
    p.add_argument("--seed-key", action="append", dest="seed_keys", help="config key(s) to average over (default: seed)")
    p.add_argument("--title", help="the report's heading")
    p.add_argument("--wandb-report", action="store_true", help="also create a W&B report (online, wandb-workspaces)")
    p.add_argument("--wandb-project", default="tunelab")
    p.add_argument("--wandb-entity", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    quiet_libraries()
    from tunelab.report import build_report
    from tunelab.report.wandb_sync import create_wandb_report

    try:
        report = build_report(args.dirs, out=args.out, metrics=args.metrics,
                              seed_keys=tuple(args.seed_keys or ("seed",)), title=args.title)
        for warning in report.comparison.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(report.markdown_path.read_text().split("## Every run")[0].rstrip())
        print(f"\nreport: {report.markdown_path} (plots: {', '.join(p.name for p in report.plots.values())})")
        if args.wandb_report:
            url = create_wandb_report(report.comparison, args.title or "tunelab study", args.wandb_project,
                                      args.wandb_entity, report.metrics)
            print(f"W&B report: {url}")
        elif report.hint:
            print(report.hint.splitlines()[0] + " (see report.md for the command)")
    except TunelabError as err:
        die(str(err), err.exit_code)


if __name__ == "__main__":
    main()
