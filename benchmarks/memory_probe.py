"""Where a benchmark runner's memory goes: RSS after each setup stage and at each point of a training step.

    python benchmarks/memory_probe.py --mode lora --steps 4 [override ...]

Runs tunelab's runner of bench_sft.py (same workload, same config) in this process for a few steps
with a 2 ms RSS sampler in a thread, and prints RSS (MB) after imports, model load, data, adapter,
and at the start/end of forward, backward and optimizer step, plus the highest sample of each step
and the process's high-water mark (VmHWM). Extra arguments are tunelab overrides
(e.g. runtime.gradient_checkpointing=true).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """Highest RSS seen since the last `take()`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.high = 0.0
        self.stop = False

    def run(self):
        while not self.stop:
            self.high = max(self.high, status("VmRSS"))
            time.sleep(0.002)

    def take(self) -> float:
        high, self.high = self.high, status("VmRSS")
        return high


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="lora")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--examples", type=int, default=480)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    marks: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        marks.append((name, status("VmRSS")))
        print(f"{name:40s} RSS {marks[-1][1]:8.0f} MB", flush=True)

    mark("start")
    import pytorch_lightning as pl

    import runners
    import workload
    from tunelab.run.assemble import build_datamodule, build_module, build_trainer, finalize, load_model

    mark("imports")
    work = Path("/tmp/tunelab-bench")
    work.mkdir(parents=True, exist_ok=True)
    data = workload.write(work / "pairs.jsonl", n=args.examples)
    spec = {"mode": args.mode, "data": str(data), "warmup": 0, "timed": args.steps, "block": args.steps,
            "batch_size": 8, "max_length": 256, "trainer": "cpu", "overrides": args.overrides, "work": str(work / "probe")}
    cfg = finalize(runners.compose(spec))
    pl.seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg)
    mark("model loaded")
    datamodule = build_datamodule(cfg, tokenizer)
    mark("data set up")
    module = build_module(cfg, model, tokenizer)
    mark("adapter + module")
    by_dtype: dict[str, float] = {}
    for p in module.parameters():
        key = f"{p.dtype} {'trainable' if p.requires_grad else 'frozen'}"
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size() / 2**20
    print("parameters:", ", ".join(f"{k} {v:.0f} MB" for k, v in by_dtype.items()))
    sampler = Sampler()
    sampler.start()
    highs: list[float] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sampler.take()
            mark(f"step {batch_idx} start")

        def on_before_backward(self, trainer, pl_module, loss):
            mark(f"step {trainer.global_step} forward done (high {sampler.take():.0f})")

        def on_after_backward(self, trainer, pl_module):
            mark(f"step {trainer.global_step} backward done (high {sampler.take():.0f})")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            highs.append(sampler.take())
            mark(f"step {batch_idx} end (optimizer high {highs[-1]:.0f})")

    trainer = build_trainer(cfg, logger=False, callbacks=[Probe()], enable_checkpointing=False,
                            default_root_dir=spec["work"])
    trainer.fit(module, datamodule=datamodule)
    sampler.stop = True
    print(f"VmHWM (whole process) {status('VmHWM'):.0f} MB; now RssAnon {status('RssAnon'):.0f} MB, "
          f"RssFile {status('RssFile'):.0f} MB (file-backed: libraries and memory-mapped weights)")


if __name__ == "__main__":
    main()
