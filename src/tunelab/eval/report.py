"""Base-vs-tuned reports: the terminal table, predictions.jsonl, report.md and logger tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")  # perplexity also covers lm-eval's word_/byte_perplexity
NOT_SCORES = ("new_tokens", "index")
LABELS = {"base": "base", "few_shot": "few-shot base", "tuned": "tuned", "model": "model (zero-shot)"}


def comparison(base: dict, tuned: dict) -> dict:
    return {k: tuned[k] - base[k] for k in tuned if k in base}


def better(key: str, delta: float) -> bool:
    return delta < 0 if key.endswith(LOWER_IS_BETTER) or "/errors/" in key else delta > 0


def print_comparison(base: dict, tuned: dict, title: str, few_shot: dict | None = None,
                     labels: tuple[str, str] = ("base", "tuned")) -> None:
    """The terminal table: reference (`base`) and candidate (`tuned`) columns under their labels, in
    report.md's order, and the change from the first to the second."""
    table = Table(title=title)
    reference, candidate = labels
    columns = ["metric", reference] + (["few-shot"] if few_shot else []) + [candidate, "change"]
    for column in columns:
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, value in tuned.items():
        shots = [fmt(few_shot.get(key))] if few_shot else []
        if key not in base:
            table.add_row(key, "-", *shots, fmt(value), "")
            continue
        delta = value - base[key]
        colour = "green" if better(key, delta) else "red"
        table.add_row(key, fmt(base[key]), *shots, fmt(value), f"[{colour}]{delta:+.4f}[/{colour}]")
    Console().print(table)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def score_keys(rows: list[dict]) -> list[str]:
    keys = []
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_SCORES + tuple(keys):
                keys.append(key)
    return keys


def side_by_side(results: dict) -> list[dict]:
    """One record per example: prompt, reference, and each model's output and scores."""
    names = [n for n, r in results.items() if r is not None and r.rows]
    if not names:
        return []
    records = []
    for i, first in enumerate(results[names[0]].rows):
        record = {"prompt": first.get("prompt"), "reference": first.get("reference")}
        for name in names:
            rows = results[name].rows
            if i < len(rows):
                record[name] = {k: v for k, v in rows[i].items() if k not in ("prompt", "reference")}
        records.append(record)
    return records


@rank_zero_only
def write_predictions(path: Path, results: dict) -> None:
    records = side_by_side(results)
    if records:
        path.write_text("".join(json.dumps(r, default=float) + "\n" for r in records))


def cell(text, limit: int = 300) -> str:
    text = str(text if text is not None else "")
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def metrics_table(results: dict) -> list[str]:
    names = [n for n, r in results.items() if r is not None]
    keys = list(dict.fromkeys(k for n in names for k in results[n].metrics))
    delta_pairs = [(b, t) for b, t in (("base", "tuned"), ("few_shot", "tuned"), ("base", "few_shot"),
                                                    ("model", "few_shot"))
                   if b in names and t in names]
    header = ["metric"] + [LABELS.get(n, n) for n in names] + [f"Δ {LABELS[t]} − {LABELS[b]}" for b, t in delta_pairs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        values = [results[n].metrics.get(key) for n in names]
        deltas = []
        for b, t in delta_pairs:
            vb, vt = results[b].metrics.get(key), results[t].metrics.get(key)
            if vb is None or vt is None:
                deltas.append("")
                continue
            delta = vt - vb
            deltas.append(f"{delta:+.4f} {'✓' if better(key, delta) else ('' if delta == 0 else '✗')}".strip())
        lines.append("| " + " | ".join([key] + [fmt(v) for v in values] + deltas) + " |")
    return lines


def summaries_section(results: dict) -> list[str]:
    lines = []
    names = [n for n, r in results.items() if r is not None and r.summaries]
    kinds = list(dict.fromkeys(k for n in names for k in results[n].summaries))
    for kind in kinds:
        lines += ["", f"## {kind.replace('_', ' ').capitalize()}", ""]
        per_model = {n: results[n].summaries.get(kind, {}) for n in names}
        categories = list(dict.fromkeys(c for s in per_model.values() for c in s if isinstance(s[c], dict)))
        counted = [c for c in categories if any("count" in per_model[n].get(c, {}) for n in names)]
        if counted:
            lines += ["| category | " + " | ".join(LABELS.get(n, n) for n in names) + " |",
                      "|" + "---|" * (len(names) + 1)]
            for c in counted:
                counts = [f"{per_model[n].get(c, {}).get('count', '-')} "
                          f"({per_model[n].get(c, {}).get('rate', 0):.0%})" for n in names]
                lines.append(f"| {c} | " + " | ".join(counts) + " |")
            lines.append("")
            for n in names:
                for c in counted:
                    for example in per_model[n].get(c, {}).get("examples", []):
                        extra = f" — words: {', '.join(example['words'])}" if example.get("words") else ""
                        extra += f" — {cell(example['reason'], 200)}" if example.get("reason") else ""
                        lines.append(f"- **{LABELS.get(n, n)} / {c}**: {cell(example.get('prompt'), 120)} → "
                                     f"{cell(example.get('prediction'), 200)}{extra}")
        scalars = {n: {k: v for k, v in per_model[n].items() if not isinstance(v, dict)} for n in names}
        for n in names:
            if scalars[n]:
                lines.append(f"- {LABELS.get(n, n)}: " + ", ".join(f"{k}={fmt(v)}" for k, v in scalars[n].items()))
    return lines


def examples_table(records: list[dict], names: list[str], limit: int | None) -> list[str]:
    keys = score_keys([record[n] for record in records for n in names if n in record])
    header = ["#", "prompt", "reference"] + [LABELS.get(n, n) for n in names] + keys + ["errors"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, record in enumerate(records[: limit or None]):
        outputs = [cell(record.get(n, {}).get("prediction")) for n in names]
        scores = []
        for key in keys:
            values = [record.get(n, {}).get(key) for n in names]
            text = " / ".join(f"{v:.2f}" if isinstance(v, (int, float)) else "-" for v in values)
            first, last = values[0], values[-1]
            if len(names) > 1 and isinstance(first, (int, float)) and isinstance(last, (int, float)):
                text += f" ({last - first:+.2f})"
            scores.append(text)
        errors = " / ".join(",".join(record.get(n, {}).get("errors", [])) or "-" for n in names)
        lines.append("| " + " | ".join([str(i + 1), cell(record["prompt"], 160), cell(record["reference"], 160)]
                                       + outputs + scores + [errors]) + " |")
    return lines


@rank_zero_only
def write_markdown(path: Path, results: dict, title: str, samples: int = 8, per_example_table: bool = True,
                   extra: dict | None = None) -> None:
    names = [n for n, r in results.items() if r is not None and r.rows]
    records = side_by_side(results)
    lines = [f"# {title}", ""]
    for key, value in (extra or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "## Metrics", ""] + metrics_table(results)
    lines += summaries_section(results)
    if records:
        scored = " / ".join(LABELS.get(n, n) for n in names)
        lines += ["", f"## Samples (first {min(samples, len(records))}; scores are {scored}, (last − first))", ""]
        lines += examples_table(records, names, samples)
        if per_example_table and len(records) > samples:
            lines += ["", f"## Every example ({len(records)})", ""] + examples_table(records, names, None)
    path.write_text("\n".join(lines) + "\n")


def log_tables(loggers: list, results: dict) -> None:
    """The side-by-side table as a W&B table on every WandbLogger (other loggers have no tables)."""
    from pytorch_lightning.loggers import WandbLogger

    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    records = side_by_side(results)
    if not wandb_loggers or not records:
        return
    names = [n for n, r in results.items() if r is not None and r.rows]
    keys = score_keys([record[n] for record in records for n in names if n in record])
    columns = ["prompt", "reference"] + [f"{n}/prediction" for n in names] + [f"{n}/{k}" for n in names for k in keys]
    columns += [f"{n}/errors" for n in names]
    data = []
    for record in records:
        row = [record["prompt"], record["reference"]] + [record.get(n, {}).get("prediction") for n in names]
        row += [record.get(n, {}).get(k) for n in names for k in keys]
        row += [", ".join(record.get(n, {}).get("errors", [])) for n in names]
        data.append(row)
    for logger in wandb_loggers:
        logger.log_table(key="eval/predictions", columns=columns, data=data)


def metrics_sections(results: dict) -> dict:
    """Extra metrics.json sections: the few-shot baseline and each model's summaries."""
    sections = {}
    if results.get("few_shot") is not None:
        sections["few_shot"] = results["few_shot"].metrics
    summaries = {n: r.summaries for n, r in results.items() if r is not None and r.summaries}
    if summaries:
        sections["summaries"] = summaries
    return sections


def write_reports(run_dir: Path, results: dict, evaluator, title: str, loggers: list = (), extra: dict | None = None) -> dict:
    """predictions.jsonl, report.md, the blind A/B sheet and logger tables; returns metrics.json sections."""
    from tunelab.eval.review import export_sheet

    report = {"samples": 8, "per_example_table": True, **getattr(evaluator, "report", {})}
    review = {"export": True, "seed": 0, **getattr(evaluator, "review", {})}
    write_predictions(run_dir / "predictions.jsonl", results)
    write_markdown(run_dir / "report.md", results, title, report["samples"], report["per_example_table"], extra)
    if review["export"]:
        export_sheet(run_dir, results, seed=review["seed"])
    log_tables(list(loggers), results)
    return metrics_sections(results)
