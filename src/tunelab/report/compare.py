"""Which config values differ between runs, how runs group, and mean ± std over seeds per group."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from tunelab.errors import TunelabError
from tunelab.report.runs import COLLAPSED, COLLAPSED_AT, DIVERGED, FAILED, FINISHED, INCOMPLETE, NOT_DONE, PRUNED, Run

# Values that name the run rather than configure it: never a reason to split or to warn.
LABEL_KEYS = ("run_name", "tags", "study", "overwrite", "ckpt_path")
LABEL_PREFIXES = ("paths.", "hydra.")
# Shown in the table when present, in this order; --metric adds to them.
DEFAULT_METRICS = ("tuned/test/loss", "tuned/test/perplexity", "tuned/test/rougeL", "tuned/test/semantic_similarity",
                   "tuned/test/exact_match", "tuned/test/correct", "train/val/loss", "train/fit_seconds",
                   "train/tokens_processed", "train/generated_tokens", "train/peak_memory_mb", "train/trainable_params")
SPLIT_SEED = "data.split_seed"  # which examples are held out: runs compared on different test splits are not like with like


@dataclass
class Comparison:
    runs: list[Run]
    group_keys: list[str]                 # what the study varies (seed excluded)
    seed_keys: list[str]                  # averaged over
    labels: dict[str, str]                # run name -> its group's label
    differing: list[str]                  # resolved config keys that differ between runs
    warnings: list[str] = field(default_factory=list)
    split_seeds: dict = field(default_factory=dict)  # data.split_seed -> how many runs used it

    def split_line(self) -> str:
        """Which test split(s) the runs were evaluated on, for the report's header."""
        if not self.split_seeds:
            return f"Test split: `{SPLIT_SEED}` not recorded in any run's config."
        recorded = sum(self.split_seeds.values())
        runs = f"all {recorded} runs" if recorded == len(self.runs) else f"the {recorded} of {len(self.runs)} runs that record it"
        if len(self.split_seeds) == 1:
            return f"Test split: `{SPLIT_SEED}={next(iter(self.split_seeds))}` in {runs}: one test split."
        used = ", ".join(f"{seed} ({count} runs)" for seed, count in self.split_seeds.items())
        return f"Test split: `{SPLIT_SEED}` = {used} in {runs}: different test splits."

    def groups(self) -> list[str]:
        return list(dict.fromkeys(self.labels[run.name] for run in self.runs))


def parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def as_hashable(value):
    return repr(value) if isinstance(value, (list, dict)) else value


def is_label_key(key: str, value, run: Run) -> bool:
    if key in LABEL_KEYS or key.startswith(LABEL_PREFIXES):
        return True
    # anything that points into a run folder (checkpoint dirs, logger save dirs) names the run
    return isinstance(value, str) and any(part in value for part in (str(run.path), "/runs/", "/multirun/"))


def differing_config_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for run in runs for k in run.config})
    differing = []
    for key in keys:
        values = {as_hashable(run.config.get(key, "<unset>")) for run in runs}
        if len(values) > 1 and not any(is_label_key(key, run.config.get(key), run) for run in runs):
            differing.append(key)
    return differing


def seed_derived_keys(runs: list[Run], differing: list[str], seed_keys: list[str]) -> list[str]:
    """Keys that move with the seed in every run (data.seed = ${seed}; data.split_seed in runs made before it was
    fixed at 42): averaged over too."""
    derived = []
    for key in differing:
        if key in seed_keys:
            continue
        if any(all(run.config.get(key) == run.config.get(seed) for run in runs) for seed in seed_keys):
            derived.append(key)
    return derived


def varying_override_keys(runs: list[Run]) -> list[str]:
    keys = list(dict.fromkeys(parse_override(o)[0] for run in runs for o in run.overrides))
    per_run = [dict(map(parse_override, run.overrides)) for run in runs]
    return [k for k in keys if len({values.get(k, "<default>") for values in per_run}) > 1]


def group_label(values: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={values.get(k, '<default>')}" for k in keys) or "all runs"


def compare(runs: list[Run], seed_keys: tuple[str, ...] = ("seed",)) -> Comparison:
    if not runs:
        raise TunelabError("no runs to compare")
    differing = differing_config_keys([run for run in runs if run.config])  # a pending trial has none yet
    seeds = list(seed_keys) + seed_derived_keys(runs, differing, list(seed_keys))
    by_overrides = any(run.overrides for run in runs)
    if by_overrides:  # the user's own variables, as typed: adapter=full, not the 12 keys it changes
        group_keys = [k for k in varying_override_keys(runs) if k not in seeds]
        values = {run.name: dict(map(parse_override, run.overrides)) for run in runs}
    else:             # hand-made or foreign run dirs: the resolved values that differ
        group_keys = [k for k in differing if k not in seeds]
        values = {run.name: {k: as_hashable(run.config.get(k, "<unset>")) for k in group_keys} for run in runs}
    labels = {run.name: group_label(values[run.name], group_keys) for run in runs}
    comparison = Comparison(runs, group_keys, seeds, labels, differing, split_seeds=split_seeds(runs))
    comparison.warnings += split_warnings(comparison.split_seeds)
    comparison.warnings += confound_warnings(comparison, seeds)
    comparison.warnings += status_warnings(runs)
    return comparison


def split_seeds(runs: list[Run]) -> dict:
    """How many runs held out their test split with each data.split_seed (runs that record one)."""
    seeds = [run.config[SPLIT_SEED] for run in runs if SPLIT_SEED in run.config]
    return {seed: seeds.count(seed) for seed in dict.fromkeys(seeds)}


def split_warnings(seeds: dict) -> list[str]:
    if len(seeds) < 2:
        return []
    return [f"different test splits: the runs held out their test examples with {SPLIT_SEED} "
            f"{', '.join(map(str, seeds))}, so their differences mix data variance into what is compared; "
            f"give every run one {SPLIT_SEED}"]


def confound_warnings(comparison: Comparison, seeds: list[str]) -> list[str]:
    """A value that differs between runs of one group was not swept: the comparison is confounded."""
    warnings = []
    for key in comparison.differing:
        if key in seeds or key == SPLIT_SEED:  # different test splits have their own warning
            continue
        for label in comparison.groups():
            members = [r for r in comparison.runs if comparison.labels[r.name] == label and r.config]
            values = {as_hashable(r.config.get(key, "<unset>")) for r in members}
            if len(values) > 1:
                warnings.append(f"confounded: `{key}` differs within group '{label}' ({', '.join(map(str, sorted(values, key=str)))}) "
                                "but was not swept; compare like with like or add it to the sweep")
                break
    return warnings


def status_warnings(runs: list[Run]) -> list[str]:
    warnings = []
    for run in runs:
        if run.status == FAILED:
            warnings.append(f"failed: {run.name}: {(run.error or '').splitlines()[0] if run.error else 'FAILED'}")
        elif run.status == DIVERGED:
            warnings.append(f"diverged: {run.name} finished with a non-finite loss; left out of the means")
        elif run.status == COLLAPSED:
            warnings.append(f"collapsed: {run.name} at step {int(run.metrics[COLLAPSED_AT])} (all rewards equal or "
                            "completions below the length floor; see its train.log); left out of the means")
        elif run.status == PRUNED:
            why = (run.path / "PRUNED").read_text().strip()
            warnings.append(f"pruned: {run.name} was stopped early by the search's pruner ({why}); left out of the means")
        elif run.status == INCOMPLETE:
            warnings.append(f"incomplete: {run.name} (no metrics.json: still running, killed, or crashed)")
        elif run.status in NOT_DONE:
            warnings.append(f"{run.status}: {run.name} (the study ledger's word; re-run the sweep's command to finish it)")
    return warnings


def choose_metrics(runs: list[Run], requested: list[str] | None) -> list[str]:
    available = sorted({k for run in runs for k in run.metrics})
    missing = [m for m in requested or [] if m not in available]
    if missing:
        raise TunelabError(f"metric(s) {', '.join(missing)} not in any finished run's metrics.json; "
                           f"available: {', '.join(available) or 'none'}")
    chosen = list(dict.fromkeys([*(requested or []), *(m for m in DEFAULT_METRICS if m in available)]))
    return chosen or available[:8]


def runs_table(comparison: Comparison, metrics: list[str]) -> pd.DataFrame:
    rows = []
    for run in comparison.runs:
        seed = run.config.get(comparison.seed_keys[0]) if comparison.seed_keys else None
        rows.append({"run": run.name, "group": comparison.labels[run.name], "seed": seed, "status": run.status,
                     **{m: run.metrics.get(m, math.nan) for m in metrics}})
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, metrics: list[str], groups: list[str]) -> pd.DataFrame:
    """Per group: mean, sample std and n over the finished runs; counts of failed and incomplete ones."""
    rows = []
    for label in groups:
        members = table[table.group == label]
        done = members[members.status == FINISHED]
        row = {"group": label, "runs": len(members), "finished": len(done),
               "failed": int(members.status.isin([FAILED, DIVERGED, COLLAPSED, PRUNED]).sum()),
               "incomplete": int(members.status.isin(NOT_DONE).sum())}
        for metric in metrics:
            values = done[metric].dropna()
            row[f"{metric}:mean"] = values.mean() if len(values) else math.nan
            row[f"{metric}:std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{metric}:n"] = len(values)
        rows.append(row)
    return pd.DataFrame(rows)
