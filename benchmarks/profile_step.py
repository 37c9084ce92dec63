"""Where a tunelab training step's time goes: torch.profiler over a few steps of the benchmark workload.

    python benchmarks/profile_step.py --mode lora --warmup 1 --steps 2 [override ...]

Same workload and config as bench_sft.py's tunelab runner; prints the operators by self CPU time
and a coarse split (matmul, attention, dtype casts, elementwise, optimizer, rest). Extra arguments
are tunelab overrides (e.g. runtime.frozen_weights_dtype=null).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GROUPS = {
    "matmul (mm, addmm, bmm, linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention (sdpa)": ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::scaled_dot_product"),
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"),
    "optimizer": ("Optimizer.step", "aten::_foreach", "aten::_fused_adamw"),
    "cross-entropy / softmax": ("aten::_log_softmax", "aten::nll_loss", "aten::cross_entropy"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="lora")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import pytorch_lightning as pl
    from torch.profiler import ProfilerActivity, profile

    import runners
    import workload
    from tunelab.run.assemble import assemble, build_trainer, finalize

    work = Path("/tmp/tunelab-bench")
    work.mkdir(parents=True, exist_ok=True)
    data = workload.write(work / "pairs.jsonl", n=480)
    spec = {"mode": args.mode, "data": str(data), "warmup": args.warmup, "timed": args.steps, "block": args.steps,
            "batch_size": 8, "max_length": 256, "trainer": "cpu", "overrides": args.overrides, "work": str(work / "profile")}
    cfg = finalize(runners.compose(spec))
    parts = assemble(cfg)
    module, datamodule = parts.module, parts.datamodule
    prof = profile(activities=[ProfilerActivity.CPU])

    class Window(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == args.warmup + args.steps - 1:
                prof.__exit__(None, None, None)

    trainer = build_trainer(cfg, logger=False, callbacks=[Window()], enable_checkpointing=False,
                            default_root_dir=spec["work"])
    trainer.fit(module, datamodule=datamodule)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events)
    split = dict.fromkeys(GROUPS, 0.0)
    split["everything else"] = 0.0
    for e in events:
        group = next((g for g, names in GROUPS.items() if e.key.startswith(names)), "everything else")
        split[group] += e.self_cpu_time_total
    print(f"self CPU time over {args.steps} steps: {total / 1e6:.1f} s")
    for group, t in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {group:36s} {t / 1e6:7.2f} s  {t / total:6.1%}")


if __name__ == "__main__":
    main()
