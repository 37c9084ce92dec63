"""Two trials of a study on this machine: in parallel (`hydra/launcher=parallel hydra.launcher.n_jobs=2`) against the
same two in sequence (the basic launcher), wall time of the whole `tunelab-train -m` command each.

    python -u benchmarks/bench_parallel_trials.py                 # the main job's training, 20 steps a trial
    python -u benchmarks/bench_parallel_trials.py --size tiny     # seconds: proves the script works

Modes (each a fresh `tunelab-train -m seed=0,1` into its own sweep dir, run one after the other):
- sequential: the basic launcher, one trial after the other in one process, runtime.threads=auto (all cores);
- parallel:   2 trials at once, runtime.threads=auto (cores / 2 each: what tunelab does now);
- parallel-oversubscribed: 2 trials at once, each with every core (runtime.threads=<cores>: what ran before
  runtime.threads existed).
Time it alone on a quiet machine: any other work on the cores changes every figure. Results: one JSON line per mode
to --out (default benchmarks/parallel_trials.json) and a markdown table on stdout, naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# What each trial trains: the main job's model and data, a fixed number of steps, no evaluation (timing training).
SIZES = {
    "main": ["trainer.max_steps=20", "eval.compare_base=false", "eval.max_examples=0", "logger=csv",
             "callbacks.checkpoint.every_n_train_steps=1000", "trainer.enable_progress_bar=false"],
    "tiny": ["debug=fast", "trainer.max_steps=4", "eval.compare_base=false", "eval.max_examples=2",
             "trainer.enable_progress_bar=false"],
}


def modes(cores: int) -> dict[str, list[str]]:
    parallel = ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    return {"sequential": [], "parallel": parallel, "parallel-oversubscribed": [*parallel, f"runtime.threads={cores}"]}


def run_mode(name: str, extra: list[str], size: list[str], work: Path) -> dict:
    sweep = work / name
    command = [sys.executable, "-m", "tunelab.cli.train", "-m", "seed=0,1", *size, *extra, f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # auto decides
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-3:]}")
    threads = sorted({json.loads(p.read_text())["hardware"]["torch_threads"] for p in sweep.glob("*/provenance.json")})
    return {"mode": name, "wall_s": round(seconds, 1), "trials": len(list(sweep.glob("*/metrics.json"))),
            "threads_per_trial": threads, "command": " ".join(command[1:])}


def main() -> None:
    from flops import cpu_kind, machine

    from tunelab.platform.threads import machine_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="main")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "parallel_trials.json")
    args = parser.parse_args()
    cores = machine_cores()
    load = os.getloadavg()[0]
    print(f"machine: {machine()}; {cpu_kind()}; {cores} cores usable; load average {load:.2f} at start")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunelab-parallel-") as tmp:
        for name, extra in modes(cores).items():
            rows.append(run_mode(name, extra, SIZES[args.size], Path(tmp)))
            print(f"{name}: {rows[-1]['wall_s']} s", flush=True)
    sequential = rows[0]["wall_s"]
    print("\n| mode (2 trials, size " + args.size + ") | wall time | vs sequential | torch threads per trial |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['wall_s']} s | {row['wall_s'] / sequential:.2f}x | {row['threads_per_trial']} |")
    record = {"machine": machine(), "cpu": cpu_kind(), "cores": cores, "size": args.size, "load_at_start": load,
              "rows": rows}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
