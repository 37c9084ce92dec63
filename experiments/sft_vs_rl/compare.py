"""Greedy answers of several policies to the same held-out prompts, scored the same way.

    python experiments/sft_vs_rl/compare.py base=embedded:smollm2-135m-instruct sft=outputs/rlhf/sft \
        ppo=outputs/rlhf/ppo dpo=outputs/rlhf/dpo --reward-run outputs/rlhf/reward --out experiments/sft_vs_rl

Each NAME=TARGET is a run dir, a final/ folder or a model. The prompts are the test split of the shipped
preference pairs (the split PPO and DPO held out); the scores are exact match and ROUGE-L against the
preferred answer (ground truth) and, with --reward-run, the learned reward model's score.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tunelab.eval.targets import resolve_target
from tunelab.methods.rl.evaluator import PolicyEvaluator
from tunelab.methods.rewards import ExactMatchReward, RewardModelScorer, RougeReward
from tunelab.models.loading import load_pretrained
from tunelab.paths import CONF_DIR


def prompts_datamodule(tokenizer, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["method=ppo", *overrides])
    dm = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all",
                     tokenization=instantiate(cfg.method.tokenization, _convert_="all"))
    dm.setup("test")
    return dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", help="NAME=TARGET (run dir, final/ folder or model)")
    parser.add_argument("--reward-run", help="a method=reward run dir whose score is reported too")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--override", action="append", default=[], help="Hydra override for the data, repeatable")
    args = parser.parse_args()

    monitors = {"rougeL": RougeReward()}
    if args.reward_run:
        monitors["reward_model"] = RewardModelScorer(args.reward_run)
    evaluator = PolicyEvaluator(ExactMatchReward(), monitors, max_examples=None, max_new_tokens=args.max_new_tokens)
    results, answers = {}, {}
    for spec in args.targets:
        name, _, target = spec.partition("=")
        resolved = resolve_target(target)
        model, tokenizer = load_pretrained(resolved.model_path)
        result = evaluator.run(model, prompts_datamodule(tokenizer, args.override))
        metrics, rows = result.metrics, result.rows
        results[name] = {("test/exact" if k == "test/reward" else k): v for k, v in metrics.items()}
        answers[name] = rows
        print(name, json.dumps(results[name]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps({"metrics": results, "answers": answers}, indent=1))
    table = markdown_table(results)
    (args.out / "comparison.md").write_text(table)
    print(table)


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(results.values())))
    lines = ["| policy | " + " | ".join(k.removeprefix("test/") for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |" for name, m in results.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
