#!/usr/bin/env bash
# DPO, KTO, ORPO and SimPO from the same start on the shipped preference pairs, 3 seeds each (one multirun,
# conf/experiment/preference_methods.yaml), then the generation metrics of every run's answers
# (tunelab-evaluate eval=default: ROUGE / exact match of greedy answers against the chosen ones), then one report.
#   bash experiments/preference/run.sh                      # into outputs/preference/
#   OUT=/tmp/pref SEEDS=0 EXTRA="debug=fast trainer.max_steps=2" bash experiments/preference/run.sh
# The multirun's study ledger skips finished runs when the script runs again after a kill.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/preference}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-dpo,kto,orpo,simpo}
EXTRA=${EXTRA:-}            # appended to every training run
EXTRA_EVAL=${EXTRA_EVAL:-}  # appended to every evaluation (e.g. eval.max_examples=4)
# shellcheck disable=SC2086  # the overrides are words
tunelab-train -m experiment=preference_methods "method=$METHODS" "seed=$SEEDS" trainer.enable_progress_bar=false \
  $EXTRA "hydra.sweep.dir=$OUT/runs" "hydra.sweep.subdir=\${hydra:runtime.choices.method}-s\${seed}"
base=true                                                      # the base model's answers: once
for run in "$OUT"/runs/*/; do
  run=${run%/}
  [ -f "$run/metrics.json" ] || continue                      # a failed run: the report lists it
  [ -f "$OUT/generation/$(basename "$run")/metrics.json" ] && continue   # done by an earlier start
  tunelab-evaluate "target=$run" eval=default eval.compare_base=$base eval.metrics.semantic_similarity=null \
    eval.metrics.error_analysis=null eval.review.export=false $EXTRA_EVAL "hydra.run.dir=$OUT/generation/$(basename "$run")"
  base=false
done
# the generation metrics per method, mean ± std over seeds (run dirs are named <method>-s<seed>)
python - "$OUT/generation" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = {}
for f in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(f.read_text())
    rows.setdefault(f.parent.name.rsplit("-s", 1)[0], []).append(m)
    if "base" in m:
        rows.setdefault("base", []).append({"tuned": m["base"]})
keys = ["test/rougeL", "test/exact_match", "test/loss"]
print("| method | runs | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
for name, ms in rows.items():
    cells = []
    for k in keys:
        v = [x["tuned"][k] for x in ms if k in x["tuned"]]
        cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else (f"{v[0]:.3f}" if v else "-"))
    print(f"| {name} | {len(ms)} | " + " | ".join(cells) + " |")
PY
tunelab-report "$OUT/runs" --title "DPO vs KTO vs ORPO vs SimPO (facts_preferences, LoRA)" \
  --metric tuned/test/accuracy --metric tuned/test/logp_accuracy --metric delta/test/logps_chosen
