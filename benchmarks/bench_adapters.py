"""Adapter variants and preference methods on the embedded SmolLM2-135M: trainable parameters, s/step and peak
memory, each variant in its own process (so its peak is its own).

    python -u benchmarks/bench_adapters.py                    # every variant below
    python -u benchmarks/bench_adapters.py --only lora,dora  # some of them

Workload: data.batch_size=4, data.max_length=128, 1 warm-up + 3 timed steps, precision `auto`. Peak memory
is the process's RSS high-water mark from the first timed step on (the reference model, when a method
builds one, is already resident then). The numbers are short-run figures for comparing variants on one
machine, not throughput claims.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name: (method, overrides)
VARIANTS = {
    "full": ("sft", ["adapter=full"]),
    "lora": ("sft", ["adapter=lora"]),
    "dora": ("sft", ["adapter=lora", "adapter.use_dora=true"]),
    "rslora": ("sft", ["adapter=lora", "adapter.use_rslora=true"]),
    "pissa": ("sft", ["adapter=lora", "adapter.init_lora_weights=pissa_niter_4"]),
    "olora": ("sft", ["adapter=lora", "adapter.init_lora_weights=olora"]),
    "gaussian": ("sft", ["adapter=lora", "adapter.init_lora_weights=gaussian"]),
    "loraplus": ("sft", ["adapter=lora", "adapter.loraplus_lr_ratio=16"]),
    "dpo-full": ("dpo", ["adapter=full"]),
    "kto-full": ("kto", ["adapter=full"]),
    "orpo-full": ("orpo", ["adapter=full"]),
    "simpo-full": ("simpo", ["adapter=full"]),
    "dpo-lora": ("dpo", ["adapter=lora"]),
    "orpo-lora": ("orpo", ["adapter=lora"]),
}
WARMUP, TIMED = 1, 3


def compose(method: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    common = [f"method={method}", "model=smollm2_135m", "data.batch_size=4", "data.max_length=128",
              "data.val_size=0", "data.test_size=0.1", f"trainer.max_steps={WARMUP + TIMED}",
              "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "logger=none", "seed=0"]
    with initialize_config_dir(str(HERE.parent / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=[*common, *overrides])


def one(name: str) -> dict:
    import pytorch_lightning as pl

    from runners import peak_memory_mb, reset_peak_memory
    from tunelab.run.assemble import assemble, build_trainer, finalize

    method, overrides = VARIANTS[name]
    cfg = finalize(compose(method, overrides))
    parts = assemble(cfg)
    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == WARMUP:
                reset_peak_memory()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)

    trainer = build_trainer(cfg, logger=False, callbacks=[Timer()], enable_checkpointing=False,
                            default_root_dir=f"/tmp/bench_adapters/{name}")
    trainer.fit(parts.module, datamodule=parts.datamodule)
    timed = times[WARMUP:]
    return {"variant": name, "method": method, "overrides": " ".join(overrides),
            "trainable_params": parts.params["trainable_params"], "total_params": parts.params["total_params"],
            "s_per_step": sum(timed) / len(timed), "peak_mb": peak_memory_mb(), "precision": cfg.trainer.precision,
            "reference_model": getattr(parts.module, "ref_model", None) is not None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one)), flush=True)
        return
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {cpu}, capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    print("| variant | method | trainable params | s/step | peak MB | reference model |\n|---|---|---|---|---|---|")
    for name in args.only.split(","):
        out = subprocess.run([sys.executable, "-u", __file__, "--one", name], capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"| {name} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:120]} | | | | |", flush=True)
            continue
        r = json.loads(line[7:])
        print(f"| {name} | {r['method']} | {r['trainable_params']:,} | {r['s_per_step']:.2f} | {r['peak_mb']:.0f} | "
              f"{'yes' if r['reference_model'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
