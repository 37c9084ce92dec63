#!/usr/bin/env bash
# experiments/distill: the teacher (SFT on the arithmetic answers, experiment=method_comparison/sft), then on-policy
# distillation of it into a fresh student (experiment=distill_arithmetic), then the table: the student's held-out
# accuracy before and after beside the teacher's (all eval=verifiable: the same 120 test questions, greedy).
#   bash experiments/distill/run.sh                                   # into outputs/distill/
#   OUT=/tmp/distill EXTRA="debug=fast trainer.max_steps=2 eval.max_examples=4" bash experiments/distill/run.sh
# A run dir that holds a finished run is kept, so the script goes on where a kill stopped it.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/distill}
SEED=${SEED:-0}
EXTRA=${EXTRA:-}      # appended to both runs
PYTHON=${PYTHON:-python}
common=(logger=csv trainer.enable_progress_bar=false "seed=$SEED")
echo "== teacher: $(date +%H:%M:%S)"
# shellcheck disable=SC2086  # the overrides are words
[ -f "$OUT/teacher/metrics.json" ] || tunelab-train experiment=method_comparison/sft study=distill "${common[@]}" \
  $EXTRA "hydra.run.dir=$OUT/teacher"
echo "== student: $(date +%H:%M:%S)"
# shellcheck disable=SC2086
[ -f "$OUT/student/metrics.json" ] || tunelab-train experiment=distill_arithmetic "${common[@]}" $EXTRA \
  "method.module.reference_model=$OUT/teacher" "hydra.run.dir=$OUT/student"
"$PYTHON" experiments/distill/table.py "$OUT"
