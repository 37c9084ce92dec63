"""tunelab vs TRL's SFTTrainer (+PEFT) on one workload, in one invocation, alternating step blocks.

    python benchmarks/bench_sft.py                      # LoRA, full fine-tuning, generation
    python benchmarks/bench_sft.py --modes lora --timed 30 --block 5

Each runner is its own process (so each has its own peak memory) and they take turns: runner A
does `--block` steps while the others wait, then B, then C, ... so CPU contention from other work
on the machine hits all of them alike. Step time is wall time from the previous step's end (or
from the runner's turn starting) to this step's end: batch fetch, forward, backward, optimizer.
The first `--warmup` steps of each runner are not timed. Results go to stdout and, as JSON, to
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import flops  # noqa: E402
import runners  # noqa: E402
import workload  # noqa: E402

LORA_RUNNERS = {
    "tunelab": [],
    "tunelab+ckpt": ["runtime.gradient_checkpointing=true"],
    "trl-defaults": [],
    "trl-best": [],
}
# TRL's defaults checkpoint activations; tunelab+ckpt is tunelab at that same setting.
FULL_RUNNERS = {"tunelab": [], "tunelab+ckpt": ["runtime.gradient_checkpointing=true"], "trl-defaults": [],
                "trl-best": []}
# Levers the lead times before they become defaults (issue 26); run them by name: --runners tunelab,tunelab+chunked
EXTRA_RUNNERS = {"tunelab+packed": ["data.packing=true"], "tunelab+chunked": ["runtime.chunked_loss=true"],
                 "tunelab+compile": ["runtime.compile=true"],
                 "tunelab+all": ["data.packing=true", "runtime.chunked_loss=true", "runtime.compile=true"]}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="lora,full,generate", help="comma list of lora, full, generate")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per runner")
    ap.add_argument("--timed", type=int, default=30, help="timed steps per runner")
    ap.add_argument("--block", type=int, default=5, help="steps a runner takes before the next one's turn")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--examples", type=int, default=480, help="synthetic instruction pairs to build")
    ap.add_argument("--runners", default=None, help="comma list to run a subset, e.g. tunelab,trl-best; also "
                    "tunelab+packed, tunelab+chunked, tunelab+compile, tunelab+all (the levers of issue 26)")
    ap.add_argument("--work", default="/tmp/tunelab-bench", help="scratch folder (data, worker logs)")
    ap.add_argument("--out", default=str(HERE / "last_run.json"))
    ap.add_argument("--trainer", default="cpu", help="tunelab trainer group: cpu or gpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args()


class Worker:
    """A runner in its own process, driven one block at a time over its stdin/stdout."""

    def __init__(self, name: str, spec: dict, work: Path):
        self.name = name
        self.log = open(work / f"{spec['mode']}-{name}.log", "w")
        cmd = [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.result: dict | None = None
        self.ready = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} died; see {self.log.name}")
        return json.loads(line)

    def turn(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        event = self.read()
        if event["event"] == "done":
            self.result = event
            self.proc.wait()
        return event


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_mode(mode: str, args, names: list[str], data: Path, work: Path) -> dict:
    overrides = {**(LORA_RUNNERS if mode == "lora" else FULL_RUNNERS), **EXTRA_RUNNERS}
    spec = {"mode": mode, "data": str(data), "warmup": args.warmup, "timed": args.timed, "block": args.block,
            "batch_size": args.batch_size, "max_length": args.max_length, "trainer": args.trainer}
    workers = []
    for name in names:
        if name in overrides:
            # One at a time: setup (imports, model load, tokenisation) is not what is compared.
            workers.append(Worker(name, {**spec, "overrides": overrides[name]}, work))
            print(f"  {mode}/{name}: ready (load {load_average()})", flush=True)
    loads, contended, dtype = [], [], flops.compute_dtype()
    while any(w.result is None for w in workers):
        for w in workers:
            if w.result is None:
                event = w.turn()
                loads.append(os.getloadavg()[0])
                # The matmul rate under the same contention as the block just run: MFU against what was on offer.
                contended.append(flops.matmul_peak(repeats=3, dtypes=(dtype,))[dtype])
                print(f"  {mode}/{w.name}: {event.get('steps', '?')} steps, last block {event.get('seconds', 0):.1f} s "
                      f"(load {load_average()})", flush=True)
    contended.sort()
    return {"mode": mode, "load_1min_during": [min(loads), max(loads)], "matmul_between_blocks": contended[len(contended) // 2],
            "between_blocks_dtype": dtype,
            "runners": {w.name: w.result for w in workers}}


def main() -> None:
    args = parse()
    if args.worker:
        return runners.serve(args.worker, json.loads(args.spec))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = workload.write(work / "pairs.jsonl", n=args.examples)
    report = {"machine": flops.machine(), "cpu_kind": flops.cpu_kind(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "load_at_start": load_average(),
              "peak": flops.matmul_peak(), "modes": {}}
    print(f"machine: {report['machine']}; {report['cpu_kind']}; load {report['load_at_start']}")
    print("matmul peak (best of repeats): " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in report["peak"].items()))
    modes = args.modes.split(",")
    for mode in ("lora", "full"):
        if mode in modes:
            names = args.runners.split(",") if args.runners else list(LORA_RUNNERS if mode == "lora" else FULL_RUNNERS)
            report["modes"][mode] = run_mode(mode, args, names, data, work)
            runners.print_table(report["modes"][mode], report["peak"])
    if "generate" in modes:
        report["modes"]["generate"] = runners.bench_generation(work, data, args)
        runners.print_generation(report["modes"]["generate"])
    report["peak_at_end"] = flops.matmul_peak()
    report["load_at_end"] = load_average()
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"load at end {report['load_at_end']}; written {args.out}")


if __name__ == "__main__":
    main()
