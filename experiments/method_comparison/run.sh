#!/usr/bin/env bash
# SFT, DPO, PPO, GRPO, RLOO, GSPO, CISPO (and GRPO at their geometry, grpo_mb2) and on-policy distillation of
# the SFT entry on the shipped arithmetic task, 3 seeds each, one evaluation (eval=verifiable: greedy answers to
# the 120 test questions; test/correct is accuracy), then one report. Each method's settings are
# conf/experiment/method_comparison/<method>.yaml; distill's teacher is the same seed's sft run, so sft comes first.
#   bash experiments/method_comparison/run.sh            # into outputs/method_comparison/
#   OUT=/tmp/mc SEEDS=0 EXTRA="debug=fast trainer.max_steps=2 eval.max_examples=4" bash experiments/method_comparison/run.sh
# Each method is one multirun over the seeds, so its study ledger skips finished seeds when the script runs
# again after a kill (a lost machine costs the seed in flight, resumed from its last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/method_comparison}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-sft dpo ppo grpo rloo gspo cispo grpo_mb2 distill}
EXTRA=${EXTRA:-}      # appended to every run
for name in $METHODS; do
  echo "== $name: $(date +%H:%M:%S)"
  teacher=()  # distill learns from the same seed's sft run of this study
  [ "$name" = distill ] && teacher=("method.module.reference_model=$OUT/sft/seed\${seed}")
  # shellcheck disable=SC2086  # the overrides are words
  tunelab-train -m "experiment=method_comparison/$name" logger=csv trainer.enable_progress_bar=false $EXTRA \
    "seed=$SEEDS" "hydra.sweep.dir=$OUT/$name" "hydra.sweep.subdir=seed\${seed}" "${teacher[@]}"
done
tunelab-report "$OUT" --title "SFT vs DPO vs PPO vs GRPO vs RLOO vs GSPO vs CISPO vs distillation on the arithmetic task"
