#!/usr/bin/env bash
# The GPU paths, run for real on any CUDA machine in under 10 minutes (issue 18, item 5):
#   {sft, dpo, ppo} x {lora, full} and grpo (LoRA, the arithmetic task) on the embedded SmolLM2-135M with the default trainer (trainer=gpu
#   where the default trainer is CPU-only), sft under trainer=ddp when 2+ GPUs are visible, sft under
#   trainer=fsdp (LoRA and full; all visible GPUs, at most 2), and the TRL comparison of bench_sft.py;
#   grpo again with generation.engine=vllm (vLLM's server from .venv-vllm, built first by scripts/setup_vllm.sh)
#   and bench_grpo.py (tunelab vs TRL GRPO, HF generate and vLLM; target: the vLLM backend >= 3x the HF
#   backend's generated tokens/s on experiment=grpo_arithmetic); then one table (run, status, fit seconds and s/step, peak memory, headline metric), printed and
#   written to $OUT/gpu_check.md.
#
#   bash benchmarks/gpu_check.sh                 # everything, into outputs/gpu_check/<time>/
#   bash benchmarks/gpu_check.sh --list          # the commands it would run (assuming 2 GPUs), nothing run
#   STEPS=20 OUT=/tmp/gc bash benchmarks/gpu_check.sh
#   EXTRA="trainer.accelerator=cpu trainer.precision=32-true debug=fast" bash benchmarks/gpu_check.sh --list
#   ALLOW_CPU=1 SKIP_BENCH=1 VLLM=0 EXTRA="trainer.accelerator=cpu trainer.precision=32-true debug=fast" \
#     bash benchmarks/gpu_check.sh      # the script itself checked on a CPU: every line run on the tiny model
#
# Exit status: 0 when every run finished, 1 when one failed (the table says which; its log is in $OUT),
# 2 with one `error:` line when no CUDA GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
STEPS=${STEPS:-10}            # optimizer steps per training run (PPO: 4 per rollout of 16 prompts)
EXAMPLES=${EXAMPLES:-16}      # generated examples per evaluation
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
EXTRA=${EXTRA:-}              # appended to every tunelab-train command (e.g. to try the lines on a CPU)
ALLOW_CPU=${ALLOW_CPU:-0}     # 1: go on without a GPU, as if there were 2 (only with EXTRA moving the runs to the CPU)
SKIP_SCALE=${SKIP_SCALE:-0}   # 1: leave out the 0.5B-class comparison (bench_gpu_scale.py)
SCALE_ARGS=${SCALE_ARGS:-"--steps 10 --warmup 3"}   # e.g. "--modes full --seq-lens 8192 --steps 20"
[ "$ALLOW_CPU" = 1 ] && [ "${1:-}" != "--list" ] && SCALE_ARGS="--tiny --seq-lens 96 --steps 2 --warmup 1"  # a CPU: the tiny size
SKIP_BENCH=${SKIP_BENCH:-0}   # 1: leave out the TRL comparisons (bench_sft.py, bench_grpo.py)
VLLM=${VLLM:-1}               # 0: leave out the vLLM rows (1 builds .venv-vllm first: vllm 0.33.0 on CUDA, minutes)
LIST=0
[ "${1:-}" = "--list" ] && LIST=1

# -- the machine: GPUs, bf16, what the default trainer does
probe=$("$PY" - <<'EOF' 2>&1
import torch
from hydra import compose, initialize_config_dir
from tunelab.paths import CONF_DIR
with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
    default = compose("train").trainer
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
bf16 = int(n > 0 and torch.cuda.is_bf16_supported())
name = torch.cuda.get_device_name(0).replace(" ", "_") if n else "none"
print(n, bf16, default.accelerator, name, torch.__version__)
EOF
)
if ! read -r NGPU BF16 DEFAULT_ACCEL CARD TORCH <<<"$(tail -n 1 <<<"$probe")" || ! [[ "$NGPU" =~ ^[0-9]+$ ]]; then
  echo "error: gpu_check: cannot import torch/tunelab with $PY: $(tail -n 1 <<<"$probe")" >&2
  exit 2
fi
if [ "$LIST" = 1 ] || [ "$ALLOW_CPU" = 1 ]; then
  NGPU=2 BF16=1 CARD=${CARD/none/no_GPU_ALLOW_CPU}
elif [ "$NGPU" = 0 ]; then
  echo "error: gpu_check: no CUDA GPU visible (torch $TORCH: torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
  exit 2
fi

SINGLE=""                                # the default trainer, if it uses a GPU at all
[ "$DEFAULT_ACCEL" = cpu ] && SINGLE="trainer=gpu"
PRECISION=""
[ "$BF16" = 1 ] || PRECISION="trainer.precision=16-mixed"   # GPUs without bf16 (T4, V100)
DEVICES=$(( NGPU >= 2 ? 2 : 1 ))
COMMON="logger=csv trainer.max_steps=$STEPS trainer.enable_progress_bar=false trainer.log_every_n_steps=1 \
callbacks.checkpoint.every_n_train_steps=1000 eval.max_examples=$EXAMPLES $PRECISION"

# name|overrides, one run each
RUNS=()
for method in sft dpo ppo; do
  for adapter in lora full; do
    case $method in
      sft) extra="" ;;
      dpo) extra="method=dpo trainer.limit_val_batches=0" ;;     # data=facts_preferences comes with it
      ppo) extra="experiment=rlhf_ppo_rouge method.evaluator.max_examples=$EXAMPLES" ;;   # ROUGE-L reward, 4 updates per rollout
    esac
    RUNS+=("$method-$adapter|$SINGLE $extra adapter=$adapter")
  done
done
RUNS+=("grpo-lora|$SINGLE experiment=grpo_arithmetic method.evaluator.max_examples=$EXAMPLES adapter=lora")   # one generation batch per step
[ "$VLLM" = 1 ] && RUNS+=("grpo-lora-vllm|$SINGLE experiment=grpo_arithmetic method.evaluator.max_examples=$EXAMPLES adapter=lora generation.engine=vllm")
[ "$NGPU" -ge 2 ] && RUNS+=("sft-lora-ddp|trainer=ddp trainer.devices=2")
RUNS+=("sft-lora-fsdp|trainer=fsdp trainer.devices=$DEVICES adapter=lora")
RUNS+=("sft-full-fsdp|trainer=fsdp trainer.devices=$DEVICES adapter=full")
TRL_CMD=("$PY" benchmarks/bench_sft.py --trainer gpu --modes lora --timed 10)
# shellcheck disable=SC2206  # the arguments are words
SCALE_CMD=("$PY" benchmarks/bench_gpu_scale.py $SCALE_ARGS)
GRPO_RUNNERS=tunelab-hf,trl-hf
[ "$VLLM" = 1 ] && GRPO_RUNNERS=$GRPO_RUNNERS,tunelab-vllm,trl-vllm
GRPO_CMD=("$PY" benchmarks/bench_grpo.py --device gpu --timed 10 --runners "$GRPO_RUNNERS")

OUT=${OUT:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
command_for() {  # the tunelab-train command line of one run
  echo "$PY -m tunelab.cli.train $COMMON ${1#*|} $EXTRA hydra.run.dir=$OUT/${1%%|*}"
}
if [ "$LIST" = 1 ]; then
  for run in "${RUNS[@]}"; do command_for "$run"; done
  [ "$VLLM" = 1 ] && echo "bash scripts/setup_vllm.sh"
  echo "${SCALE_CMD[*]} --out $OUT/bench_gpu_scale.json --work $OUT/bench_scale"
  echo "${GRPO_CMD[*]} --out $OUT/bench_grpo.json --work $OUT/bench_grpo"
  echo "${TRL_CMD[*]} --out $OUT/bench_sft.json --work $OUT/bench"
  exit 0
fi

mkdir -p "$OUT"
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
started=$SECONDS
echo "gpu_check: $NGPU x $CARD (bf16 $BF16), torch $TORCH; default trainer accelerator: $DEFAULT_ACCEL; into $OUT"
if [ "$VLLM" = 1 ]; then   # the vLLM rows' server environment (a failed build fails those rows, with its log)
  t0=$SECONDS
  timeout 1800 bash scripts/setup_vllm.sh >"$OUT/setup_vllm.log" 2>&1
  echo "  setup_vllm: exit $? after $((SECONDS - t0)) s"
fi
for run in "${RUNS[@]}"; do
  name=${run%%|*}
  t0=$SECONDS
  # shellcheck disable=SC2046  # the overrides are words
  timeout "$RUN_TIMEOUT" $(command_for "$run") >"$OUT/$name.log" 2>&1
  echo "$?" >"$OUT/$name.rc"
  echo "  $name: exit $(cat "$OUT/$name.rc") after $((SECONDS - t0)) s"
done
if [ "$SKIP_BENCH" != 1 ]; then
  t0=$SECONDS
  timeout $((RUN_TIMEOUT + 60)) "${TRL_CMD[@]}" --out "$OUT/bench_sft.json" --work "$OUT/bench" >"$OUT/bench_sft.log" 2>&1
  echo "$?" >"$OUT/bench_sft.rc"
  echo "  bench_sft (TRL comparison): exit $(cat "$OUT/bench_sft.rc") after $((SECONDS - t0)) s"
  t0=$SECONDS
  timeout $((RUN_TIMEOUT * 4)) "${GRPO_CMD[@]}" --out "$OUT/bench_grpo.json" --work "$OUT/bench_grpo" >"$OUT/bench_grpo.log" 2>&1
  echo "$?" >"$OUT/bench_grpo.rc"
  echo "  bench_grpo (GRPO vs TRL, HF and vLLM): exit $(cat "$OUT/bench_grpo.rc") after $((SECONDS - t0)) s"
fi

if [ "$SKIP_SCALE" != 1 ]; then
  t0=$SECONDS
  timeout $((RUN_TIMEOUT * 3)) "${SCALE_CMD[@]}" --out "$OUT/bench_gpu_scale.json" --work "$OUT/bench_scale" \
    >"$OUT/bench_gpu_scale.log" 2>&1
  echo "$?" >"$OUT/bench_gpu_scale.rc"
  echo "  bench_gpu_scale (0.5B-class, packed): exit $(cat "$OUT/bench_gpu_scale.rc") after $((SECONDS - t0)) s"
fi

"$PY" - "$OUT" "$NGPU x $CARD, torch $TORCH, $((SECONDS - started)) s in all" <<'EOF'
import json, sys
from pathlib import Path
import yaml

out, machine = Path(sys.argv[1]), sys.argv[2]
rows, failed = [], 0
for rc_file in sorted(out.glob("*.rc"), key=lambda p: p.stat().st_mtime):
    name, rc = rc_file.stem, rc_file.read_text().strip()
    if name in ("bench_sft", "bench_gpu_scale", "bench_grpo"):
        continue
    run = out / name
    if rc != "0" or not (run / "metrics.json").is_file():
        failed += 1
        log = (out / f"{name}.log").read_text(errors="replace").strip().splitlines() if (out / f"{name}.log").is_file() else []
        why = next((l for l in reversed(log) if l.startswith("error:") or "Error" in l), log[-1] if log else "no log")
        rows.append((name, f"FAILED (exit {rc}): {why[:120]}", "", "", ""))
        continue
    m = json.loads((run / "metrics.json").read_text())
    train = m["train"]
    cfg = yaml.safe_load((run / "resolved_config.yaml").read_text())
    section, _, key = cfg["optimized_metric"].partition("/")
    base, tuned = m.get("base", {}).get(key), m.get(section, {}).get(key)
    headline = f"{key} {base:.4g} -> {tuned:.4g}" if base is not None else f"{key} {tuned:.4g}"
    steps = train.get("global_step") or 1
    rows.append((name, f"ok ({cfg['trainer']['accelerator']}, {cfg['trainer']['precision']}, {steps} steps)",
                 f"{train['fit_seconds']:.1f} ({train['fit_seconds'] / steps:.3f})", f"{train['peak_memory_mb']:.0f}",
                 headline))
bench = out / "bench_sft.json"
if bench.is_file():
    sys.path.insert(0, "benchmarks")
    import runners
    report = json.loads(bench.read_text())
    for runner, result in report["modes"]["lora"]["runners"].items():
        s = runners.summarize(result)
        rows.append((f"bench lora {runner}", "ok", f"({s['sec_per_step']:.3f}) {s['supervised_per_s']:.0f} sup tok/s",
                     f"{s['peak_memory_mb']:.0f}", f"heldout loss {s['heldout_loss']:.4f}"))
elif (out / "bench_sft.rc").is_file():
    failed += 1
    rows.append(("bench lora (TRL)", f"FAILED (exit {(out / 'bench_sft.rc').read_text().strip()}): see bench_sft.log",
                 "", "", ""))
else:
    rows.append(("bench lora (TRL)", "skipped (SKIP_BENCH=1)", "", "", ""))
scale = out / "bench_gpu_scale.json"
if scale.is_file():
    for r in json.loads(scale.read_text())["runs"]:
        spec = r["spec"]
        name = f"scale {spec['mode']} {spec['seq_len']} {spec['runner']}"
        if "error" in r:
            failed += 1
            rows.append((name, f"FAILED: {r['error'][:120]}", "", "", ""))
        else:
            rows.append((name, "ok", f"({r['sec_per_step']:.3f}) {r['tokens_per_s']:.0f} tok/s",
                         f"{r['peak_memory_mb']:.0f}", f"MFU {r['mfu']:.1%}"))
elif (out / "bench_gpu_scale.rc").is_file():
    failed += 1
    rows.append(("scale (0.5B-class)", f"FAILED (exit {(out / 'bench_gpu_scale.rc').read_text().strip()}): "
                 "see bench_gpu_scale.log", "", "", ""))
grpo = out / "bench_grpo.json"
if grpo.is_file():
    report = json.loads(grpo.read_text())
    for runner, result in report["runners"].items():
        s = result.get("summary")
        if s is None:
            failed += result["status"].startswith("failed")
            rows.append((f"bench grpo {runner}", result["status"][:140], "", "", ""))
            continue
        rows.append((f"bench grpo {runner}", "ok", f"({s['s_per_update']:.3f}) {s['generated_tok_per_s']:.0f} gen tok/s",
                     f"{s['peak_memory_mb']:.0f}", f"generation {s['generation_share']:.0%} of an update"))
    speedup = report["ratios"].get("tunelab_vllm_over_hf_generated_tok_per_s")
    if speedup is not None:
        rows.append(("bench grpo vllm / hf", "ok" if speedup >= 3 else "below target", f"{speedup:.2f}x generated tok/s",
                     "", "target >= 3x (issue 25)"))
elif (out / "bench_grpo.rc").is_file():
    failed += 1
    rows.append(("bench grpo (TRL)", f"FAILED (exit {(out / 'bench_grpo.rc').read_text().strip()}): see bench_grpo.log",
                 "", "", ""))
head = ("run", "status", "fit s (s/step)", "peak MB", "headline (base -> tuned)")
lines = [f"GPU check: {machine}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
lines += ["| " + " | ".join(r) + " |" for r in rows]
text = "\n".join(lines) + "\n"
(out / "gpu_check.md").write_text(text)
print("\n" + text + f"\nwritten {out / 'gpu_check.md'}")
sys.exit(1 if failed else 0)
EOF
