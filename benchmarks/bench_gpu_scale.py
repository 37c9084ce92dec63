"""tunelab vs TRL's SFTTrainer at the size GPU users train: a 0.5B-class model, 2k and 8k tokens, packed.

    python benchmarks/bench_gpu_scale.py                                   # full + LoRA, 2k + 8k, on the GPU
    python benchmarks/bench_gpu_scale.py --modes full --seq-lens 8192 --steps 20
    python benchmarks/bench_gpu_scale.py --tiny --seq-lens 128 --steps 2 --warmup 1   # the CPU check (tests)

The model is Qwen2.5-0.5B's architecture (`benchmarks/models/qwen2.5-0.5b.json`, written by hand from the
public config) initialised at random: nothing is downloaded, and speed does not depend on the weights.
`--tiny` shrinks it (2 layers, width 64) so the whole path runs on a CPU in seconds.

The data are random-token SFT documents (a prompt with no labels, then a supervised completion; lengths
from a log-normal, at most the row length), the same rows for both runners, packed best-fit decreasing into
rows of the sequence length with per-document attention:
- **tunelab**: the project's config (conf/) with data.packing=true, runtime.chunked_loss=true and the given
  adapter; its trainer precision `auto` (bf16-mixed on a bf16 GPU);
- **trl-best**: SFTConfig(packing=True, packing_strategy="bfd") -> padding-free batches, its fused chunked LM
  head (always on in TRL 1.x), bf16 where tunelab runs bf16, no gradient checkpointing, Liger kernels where
  `liger_kernel` imports (`use_liger_kernel`).
Both use the same attention implementation: FlashAttention-2 where `flash_attn` imports on CUDA, else SDPA
(whose packed-document mask is a block-diagonal 4-D mask).

Each (mode, length, runner) runs in its own process. Reported per run: tokens/s (real tokens), supervised
tokens/s, MFU (benchmarks/flops.py's useful FLOPs: 2 x body params per token, causal attention per document,
the LM head at supervised tokens; x3 full, x2 + LoRA for LoRA) over the matmul peak measured on the device
at the start, and peak memory (CUDA max allocated, or the process's RSS high-water mark on a CPU). JSON to
--out, naming the GPU/CPU.
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
from runners import peak_memory_mb, reset_peak_memory  # noqa: E402

ARCH = HERE / "models" / "qwen2.5-0.5b.json"
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096}
RUNNERS = ("tunelab", "trl-best")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=str(ARCH), help="a config.json of the architecture to initialise at random")
    ap.add_argument("--tiny", action="store_true", help="2 layers of width 64, vocab 4096: the CPU check")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--seq-lens", default="2048,8192", help="row lengths (packed) to run")
    ap.add_argument("--rows", type=int, default=1, help="packed rows per step (per-device batch)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--mean-doc", type=int, default=0, help="mean document length (0: a quarter of the row)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--work", default="/tmp/tunelab-bench-scale")
    ap.add_argument("--out", default=str(HERE / "last_scale_run.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args()


def arch_config(spec: dict):
    from transformers import AutoConfig

    fields = {k: v for k, v in json.loads(Path(spec["arch"]).read_text()).items() if not k.startswith("_")}
    if spec["tiny"]:
        fields |= TINY
    fields["attn_implementation"] = spec["attn"]
    return AutoConfig.for_model(**fields)


def random_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(arch_config(spec), dtype=torch.float32).train()


def documents(spec: dict, vocab: int) -> list[dict]:
    """Random-token SFT rows: a prompt (no labels) then a completion, log-normal lengths up to the row length;
    enough of them for warmup + steps full rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    length, mean = spec["seq_len"], spec["mean_doc"] or spec["seq_len"] // 4
    budget, rows = (spec["warmup"] + spec["steps"]) * spec["rows"] * length * 1.3, []
    while budget > 0:
        n = int(np.clip(rng.lognormal(np.log(mean), 0.6), 16, length))
        prompt = int(n * rng.uniform(0.3, 0.7))
        ids = rng.integers(0, vocab, n).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        budget -= n
    return rows


class StepClock:
    """Wall time, real tokens, per-document lengths and supervised tokens of each step after the warm-up."""

    def __init__(self, warmup: int):
        import torch

        self.warmup, self.steps, self.mark, self.done = warmup, [], None, 0
        self.cuda = torch.cuda.is_available()

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        self.sync()
        self.mark = time.perf_counter()

    def end(self, input_ids, labels, position_ids, real_mask=None):
        from tunelab.data.packing import document_lengths

        self.sync()
        now = time.perf_counter()
        self.done += 1
        if self.done == self.warmup:
            reset_peak_memory()
        if self.done > self.warmup:
            real = real_mask.bool() if real_mask is not None else input_ids.new_ones(input_ids.shape, dtype=bool)
            lengths = [n for row, keep in zip(position_ids.tolist(), real.tolist())
                       for n in document_lengths([p for p, k in zip(row, keep) if k])]
            self.steps.append({"seconds": now - self.mark, "lengths": lengths,
                               "supervised": int((labels[:, 1:] != -100).sum())})
        self.mark = time.perf_counter()


def tunelab_cfg(spec: dict):
    from hydra import compose, initialize_config_dir

    from tunelab.paths import CONF_DIR

    adapter = ["adapter=lora", "adapter.r=16", "adapter.lora_alpha=32", "adapter.lora_dropout=0.0"] \
        if spec["mode"] == "lora" else ["adapter=full"]
    overrides = [*adapter, f"trainer={spec['trainer']}", f"trainer.max_steps={spec['warmup'] + spec['steps']}",
                 "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "logger=none",
                 f"data.max_length={spec['seq_len']}", f"data.batch_size={spec['rows']}", "data.packing=true",
                 "runtime.chunked_loss=true", f"optimizer.lr={spec['lr']}", "scheduler.name=constant",
                 "scheduler.warmup_ratio=0", "seed=42"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_tunelab(spec: dict, rows: list[dict], tokenizer) -> tuple[object, StepClock, dict]:
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from tunelab.data.batching import TokenizedDataset
    from tunelab.data.packing import pack_rows
    from tunelab.run.assemble import build_module, build_trainer, finalize

    cfg = finalize(tunelab_cfg(spec))
    pl.seed_everything(cfg.seed)
    module = build_module(cfg, random_model(spec), tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    # The rows are tokens already: the datamodule's own packing over them, nothing read from disk.
    datamodule.datasets = {"train": TokenizedDataset(pack_rows(rows, spec["seq_len"], "bfd")),
                           "val": TokenizedDataset([]), "test": TokenizedDataset([])}
    clock = StepClock(spec["warmup"])

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.end(batch["input_ids"], batch["labels"], batch["position_ids"], batch["attention_mask"])

    trainer = build_trainer(cfg, logger=False, callbacks=[Clock()], enable_checkpointing=False,
                            enable_model_summary=False, default_root_dir=spec["work"])
    trainer.fit(module, datamodule=datamodule)
    return module.model, clock, {"precision": str(cfg.trainer.precision), "runtime": dict(cfg.runtime)}


def run_trl(spec: dict, rows: list[dict], tokenizer) -> tuple[object, StepClock, dict]:
    import importlib.util

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.platform.hardware import auto_precision

    clock = StepClock(spec["warmup"])
    liger = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    args = SFTConfig(
        output_dir=str(Path(spec["work"]) / "trl"), per_device_train_batch_size=spec["rows"], max_length=spec["seq_len"],
        packing=True, packing_strategy="bfd", gradient_checkpointing=False, use_liger_kernel=liger,
        bf16=auto_precision("gpu" if torch.cuda.is_available() else "cpu").value == "bf16-mixed",
        max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, seed=42, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=10**6, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    peft = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear") \
        if spec["mode"] == "lora" else None

    class Clocked(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            clock.start()
            self._bench_inputs = inputs
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            inputs = trainer._bench_inputs
            clock.end(inputs["input_ids"], inputs["labels"], inputs["position_ids"])

    trainer = Clocked(model=random_model(spec), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=peft, callbacks=[Clock()])
    trainer.train()
    return trainer.model, clock, {"bf16": args.bf16, "use_liger_kernel": liger, "padding_free": trainer.padding_free}


def worker(spec: dict) -> dict:
    """One (mode, length, runner) run in this process; its result as a dict."""
    import torch

    from tunelab.models.loading import load_tokenizer

    tokenizer = load_tokenizer("embedded:smollm2-135m-instruct")  # only its pad id is used: the ids are random
    vocab = arch_config(spec).vocab_size
    rows = documents(spec, vocab)
    run = run_tunelab if spec["runner"] == "tunelab" else run_trl
    model, clock, settings = run(spec, rows, tokenizer)
    shape = flops.model_shape(model.config)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    steps = clock.steps
    seconds = sum(s["seconds"] for s in steps)
    tokens = sum(sum(s["lengths"]) for s in steps)
    useful = sum(flops.step_flops(shape, s["lengths"], s["supervised"], spec["mode"] == "full", lora) for s in steps)
    return {"spec": {k: v for k, v in spec.items() if k != "work"}, "settings": settings, "timed_steps": len(steps),
            "sec_per_step": seconds / max(len(steps), 1), "tokens_per_s": tokens / seconds if seconds else 0.0,
            "supervised_per_s": sum(s["supervised"] for s in steps) / seconds if seconds else 0.0,
            "flops_per_s": useful / seconds if seconds else 0.0, "peak_memory_mb": peak_memory_mb(),
            "params": sum(p.numel() for p in model.parameters()), "lora_params": lora,
            "torch": torch.__version__}


def attention_implementation() -> str:
    import importlib.util

    import torch

    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def device_peak() -> tuple[str, float]:
    """(dtype, FLOP/s) of the matmul tunelab trains in here, measured now (a 8192^3 product on a GPU)."""
    import torch

    dtype = flops.compute_dtype()
    size = 8192 if torch.cuda.is_available() else 1024
    return dtype, flops.matmul_peak(size=size, repeats=10, dtypes=(dtype,))[dtype]


def main() -> None:
    args = parse()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dtype, peak = device_peak()
    report = {"machine": flops.machine(), "cpu_kind": flops.cpu_kind(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "peak_dtype": dtype, "peak_flops": peak,
              "attention": attention_implementation(), "arch": Path(args.arch).name + (" (tiny)" if args.tiny else ""),
              "runs": []}
    print(f"machine: {report['machine']}; {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s; attention {report['attention']}")
    trainer = "gpu" if torch.cuda.is_available() else "cpu"
    failed = 0
    for mode in args.modes.split(","):
        for seq_len in (int(x) for x in args.seq_lens.split(",")):
            for runner in args.runners.split(","):
                spec = {"mode": mode, "seq_len": seq_len, "runner": runner, "rows": args.rows, "steps": args.steps,
                        "warmup": args.warmup, "arch": args.arch, "tiny": args.tiny, "attn": report["attention"],
                        "mean_doc": args.mean_doc, "lr": args.lr, "trainer": trainer,
                        "work": str(work / f"{mode}-{seq_len}-{runner}")}
                result = run_worker(spec, work / f"{mode}-{seq_len}-{runner}.log")
                failed += "error" in result
                result["mfu"] = result.get("flops_per_s", 0.0) / peak
                report["runs"].append(result)
                print(row_text(result), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"written {args.out}")
    sys.exit(1 if failed else 0)


def run_worker(spec: dict, log: Path) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
    log.write_text(done.stdout + done.stderr)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"spec": {k: v for k, v in spec.items() if k != "work"}, "error": f"exit {done.returncode}: {tail[0]}"}
    return json.loads(line.removeprefix("RESULT "))


def row_text(result: dict) -> str:
    spec = result["spec"]
    name = f"{spec['mode']:4s} {spec['seq_len']:5d} {spec['runner']:9s}"
    if "error" in result:
        return f"  {name} FAILED ({result['error']}); log in {spec.get('runner')}"
    return (f"  {name} {result['sec_per_step']:7.3f} s/step {result['tokens_per_s']:9.0f} tok/s "
            f"{result['supervised_per_s']:9.0f} sup tok/s  MFU {result['mfu']:6.1%}  peak {result['peak_memory_mb']:8.0f} MB")


if __name__ == "__main__":
    main()
