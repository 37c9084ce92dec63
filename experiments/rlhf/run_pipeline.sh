#!/usr/bin/env bash
# SFT -> reward model -> PPO: three normal runs, each pointing at the previous run dir.
#   experiments/rlhf/run_pipeline.sh                 # writes outputs/rlhf/{sft,reward,ppo}
#   OUT=/tmp/rlhf experiments/rlhf/run_pipeline.sh   # elsewhere
# Any stage can be re-run or swapped alone, e.g.
#   tunelab-train experiment=rlhf_ppo rlhf.sft_run=MY_SFT rlhf.reward_run=MY_RM adapter=full
set -euo pipefail
OUT=${OUT:-outputs/rlhf}
tunelab-train experiment=rlhf_sft hydra.run.dir="$OUT/sft" overwrite=true
tunelab-train experiment=rlhf_reward hydra.run.dir="$OUT/reward" overwrite=true
tunelab-train experiment=rlhf_ppo hydra.run.dir="$OUT/ppo" rlhf.sft_run="$OUT/sft" rlhf.reward_run="$OUT/reward" overwrite=true
python experiments/rlhf/plot.py "$OUT/reward" "$OUT/ppo" --out "$OUT"
