"""Curves of reward-model and PPO runs from their csv/metrics.csv: python plot.py RUN_DIR... --out DIR"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

SMOOTH = 8  # rollouts in the running mean drawn over PPO curves

PANELS = {
    "reward": ["train/loss", "train/accuracy", "val/accuracy", "val/margin"],
    "ppo": ["ppo/reward", "ppo/monitor_rougeL", "ppo/monitor_exact", "ppo/kl", "ppo/entropy",
            "ppo/completion_length", "ppo/clip_ratio/region_mean", "ppo/explained_variance"],
}
# The names before the on-policy module (src/tunelab/methods/rl/), so runs recorded earlier still plot.
EARLIER = {"ppo/score": "ppo/reward", "ppo/response_length": "ppo/completion_length",
           "ppo/clipfrac": "ppo/clip_ratio/region_mean"}


def plot(run_dir: Path, out: Path) -> Path | None:
    frame = pd.read_csv(run_dir / "csv" / "metrics.csv").rename(columns=EARLIER)
    kind = "ppo" if "ppo/reward" in frame else "reward"
    columns = [c for c in PANELS[kind] if c in frame]
    if not columns:
        return None
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 2.8))
    for ax, column in zip(list(axes) if len(columns) > 1 else [axes], columns):
        series = frame[["step", column]].dropna()
        ax.plot(series["step"], series[column], marker=".", alpha=0.5 if kind == "ppo" else 1.0)
        if kind == "ppo" and len(series) >= 2 * SMOOTH:
            # one rollout is 16 prompts, so a 0-1 score moves by 1/16 per answer: the mean shows the trend
            smooth = series[column].rolling(SMOOTH, min_periods=SMOOTH).mean()
            ax.plot(series["step"], smooth, color="black", linewidth=1.2, label=f"mean of {SMOOTH}")
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("rollout" if kind == "ppo" else "optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    target = out / f"{run_dir.name}.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        print(plot(run, args.out))
