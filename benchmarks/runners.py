"""The benchmark's runners (tunelab, TRL), each driven in turns by bench_sft.py, and its tables."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

import flops

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(spec: dict):
    """tunelab's own config for the workload: the levers are whatever conf/ says unless overridden."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    adapter = ["adapter=lora", "adapter.r=16", "adapter.lora_alpha=32"] if spec["mode"] == "lora" else ["adapter=full"]
    overrides = [
        "data=custom", f"data.source={spec['data']}", "data.val_size=0", "data.test_size=0.1",
        f"data.max_length={spec['max_length']}", f"data.batch_size={spec['batch_size']}",
        *adapter, f"trainer={spec['trainer']}", f"trainer.max_steps={spec['warmup'] + spec['timed']}",
        "trainer.enable_progress_bar=false", "logger=none", "scheduler.name=linear", "scheduler.warmup_ratio=0",
        "seed=42", *spec.get("overrides", []),
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


class Baton:
    """Times each step and hands the turn back to the driver every `block` steps."""

    def __init__(self, spec: dict, channel):
        self.warmup, self.timed, self.block = spec["warmup"], spec["timed"], spec["block"]
        self.channel = channel
        self.steps: list[dict] = []
        self.done = 0
        self.mark = 0.0
        self.peak = None

    def wait(self) -> None:
        if sys.stdin.readline().strip() != "go":
            raise SystemExit(0)
        self.mark = time.perf_counter()

    def send(self, event: dict) -> None:
        self.channel.write(json.dumps(event) + "\n")
        self.channel.flush()

    def step_end(self, attention_mask: torch.Tensor, labels: torch.Tensor, loss: float,
                 position_ids: torch.Tensor | None = None) -> None:
        now = time.perf_counter()
        self.done += 1
        if self.done > self.warmup:
            lengths = attention_mask.sum(1).tolist()
            if position_ids is not None:  # packed rows (data.packing): attention is per document
                from tunelab.data.packing import document_lengths

                lengths = [n for row, real in zip(position_ids.tolist(), attention_mask.tolist())
                           for n in document_lengths([p for p, k in zip(row, real) if k])]
            self.steps.append({"seconds": now - self.mark, "lengths": lengths, "padded": attention_mask.numel(),
                               "supervised": int((labels[:, 1:] != -100).sum()), "loss": loss})
        if self.done == self.warmup:
            reset_peak_memory()
        if self.done == self.warmup + self.timed:
            self.peak = peak_memory_mb()
        elif self.done >= self.warmup and (self.done - self.warmup) % self.block == 0:
            self.send({"event": "block", "steps": self.done, "seconds": sum(s["seconds"] for s in self.steps[-self.block:])})
            self.wait()
        self.mark = time.perf_counter()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_memory() -> None:
    """Peak memory counts from the first timed step: RSS high-water mark reset (Linux), or CUDA's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@torch.no_grad()
def heldout_loss(model, datamodule) -> float:
    """Token-weighted loss on the fixed test split, the same forward (tunelab's precision for this machine)
    and function for every runner."""
    from tunelab.core.inference import autocast
    from tunelab.core.losses import token_loss_sum

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in datamodule.test_dataloader():
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast("auto", device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n = token_loss_sum(logits, batch["labels"])
        total, count = total + float(loss), count + int(n)
    model.train(was)
    return total / max(count, 1)


def build_data(cfg):
    from tunelab.run.assemble import build_datamodule, load_model

    model, tokenizer = load_model(cfg)
    return model, tokenizer, build_datamodule(cfg, tokenizer)


def run_tunelab(spec: dict, baton: Baton):
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from tunelab.run.assemble import assemble, build_trainer, finalize

    cfg = finalize(compose(spec))
    parts = assemble(cfg)
    module, datamodule = parts.module, parts.datamodule

    class Timer(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            baton.step_end(batch["attention_mask"], batch["labels"], float(outputs["loss"]), batch.get("position_ids"))

    trainer = build_trainer(cfg, logger=False, callbacks=[Timer()], enable_checkpointing=False,
                            default_root_dir=spec["work"])
    baton.wait()
    trainer.fit(module, datamodule=datamodule)
    return module.model, datamodule, {"settings": OmegaConf.to_container(cfg.method.module) | OmegaConf.to_container(cfg.runtime) | {
        "precision": cfg.trainer.precision, "group_by_length": cfg.data.group_by_length, "lr": cfg.optimizer.lr}}


def run_trl(spec: dict, baton: Baton, best: bool):
    """TRL's SFTTrainer on the very same token ids and labels (pre-tokenized, so used as is).

    defaults: SFTConfig as shipped (bf16, gradient checkpointing, random order).
    best: the precision this machine computes fastest (bf16 only where it is native and faster: tunelab's
    own resolution, so bf16=False on AVX2), no checkpointing (memory is not short here) and exactly
    tunelab's batch order, which is length-grouped, so both see the same batches and the same padding
    and their losses compare 1:1.
    """
    from tunelab.platform.hardware import auto_precision

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cfg = compose(spec)
    model, tokenizer, datamodule = build_data(cfg)
    train = datamodule.datasets["train"]
    order = list(range(len(train)))
    if best:
        order = [j for batch in datamodule.train_dataloader().batch_sampler for j, _ in batch]
    dataset = Dataset.from_list([{"input_ids": train.rows[j]["input_ids"], "labels": train.rows[j]["labels"]}
                                 for j in order])
    settings = {}
    if best:
        settings["bf16"] = auto_precision("gpu" if torch.cuda.is_available() else "cpu").value == "bf16-mixed"
        settings |= {"gradient_checkpointing": False, "train_sampling_strategy": "sequential"}
    args = SFTConfig(
        output_dir=str(Path(spec["work"]) / "trl"), per_device_train_batch_size=spec["batch_size"],
        max_length=spec["max_length"], max_steps=spec["warmup"] + spec["timed"], learning_rate=cfg.optimizer.lr,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, seed=cfg.seed, report_to="none",
        save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), **settings,
    )
    peft = None
    if spec["mode"] == "lora":
        peft = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self._bench_inputs = inputs
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._bench_loss = float(loss)
            return loss

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            inputs = trainer._bench_inputs
            baton.step_end(inputs["attention_mask"], inputs["labels"], trainer._bench_loss)

    trainer = Counting(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft,
                       callbacks=[Timer()])
    baton.wait()
    trainer.train()
    used = {k: getattr(args, k) for k in ("bf16", "gradient_checkpointing", "train_sampling_strategy", "optim",
                                          "learning_rate", "logging_steps")}
    return trainer.model, datamodule, {"settings": used}


def serve(name: str, spec: dict) -> None:
    """Worker process: protocol on the original stdout, everything else to stderr."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = {**spec, "work": str(Path("/tmp/tunelab-bench") / f"{spec['mode']}-{name}")}
    baton = Baton(spec, channel)
    baton.send({"event": "ready"})
    if name.startswith("tunelab"):
        model, datamodule, extra = run_tunelab(spec, baton)
    else:
        model, datamodule, extra = run_trl(spec, baton, best=name == "trl-best")
    shape = flops.model_shape(model.config)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    for step in baton.steps:
        lengths = step.pop("lengths")
        step["real"] = sum(lengths)
        step["flops"] = flops.step_flops(shape, lengths, step["supervised"], spec["mode"] == "full", lora)
    baton.send({"event": "done", "steps": baton.done, "timed": baton.steps, "peak_memory_mb": baton.peak,
                "heldout_loss": heldout_loss(model, datamodule), **extra})


def summarize(result: dict) -> dict:
    steps = result["timed"]
    seconds = sum(s["seconds"] for s in steps)
    return {
        "sec_per_step": seconds / len(steps),
        "flops_per_s": sum(s["flops"] for s in steps) / seconds,
        "supervised_per_s": sum(s["supervised"] for s in steps) / seconds,
        "pad_fraction": 1 - sum(s["real"] for s in steps) / sum(s["padded"] for s in steps),
        "tokens_per_s": sum(s["real"] for s in steps) / seconds,
        "last_loss": sum(s["loss"] for s in steps[-5:]) / len(steps[-5:]),
        "peak_memory_mb": result["peak_memory_mb"],
        "heldout_loss": result["heldout_loss"],
    }


def runner_dtype(result: dict) -> str:
    """The matmul dtype a runner computed in: tunelab's resolved trainer.precision, TRL's bf16 flag."""
    settings = result.get("settings", {})
    bf16 = str(settings.get("precision", "")).startswith("bf16") or settings.get("bf16") is True
    return "bfloat16" if bf16 else "float32"


def print_table(mode_result: dict, peak: dict) -> None:
    rows = {name: summarize(r) for name, r in mode_result["runners"].items()}
    base = {k: rows[k] for k in ("trl-defaults", "trl-best") if k in rows}
    dtype, between = mode_result["between_blocks_dtype"], mode_result["matmul_between_blocks"]
    print(f"\n{mode_result['mode']}: load (1 min) during {mode_result['load_1min_during']}; {dtype} matmul between "
          f"blocks (median) {between / 1e12:.3f} TFLOP/s; MFU vs the best-of peak of the dtype each runner computed "
          f"in (vs the between-blocks {dtype} rate)")
    head = f"{'runner':14s} {'s/step':>7s} {'tok/s':>7s} {'sup tok/s':>9s} {'pad':>5s} {'dtype':>8s} {'MFU (between)':>14s} " \
           f"{'peak MB':>8s} {'loss@N':>7s} {'heldout':>7s}" + "".join(f" {'x ' + k:>15s}" for k in base)
    print(head)
    for name, s in rows.items():
        ratios = "".join(f" {s['supervised_per_s'] / b['supervised_per_s']:15.2f}" for b in base.values())
        ran = runner_dtype(mode_result["runners"][name])
        print(f"{name:14s} {s['sec_per_step']:7.2f} {s['tokens_per_s']:7.0f} {s['supervised_per_s']:9.0f} "
              f"{s['pad_fraction']:5.2f} {ran:>8s} {s['flops_per_s'] / peak[ran]:6.1%} ({s['flops_per_s'] / between:5.1%}) "
              f"{s['peak_memory_mb']:8.0f} "
              f"{s['last_loss']:7.3f} {s['heldout_loss']:7.3f}{ratios}")


def bench_generation(work: Path, data: Path, args, prompts: int = 24, new_tokens: int = 32, rounds: int = 2) -> dict:
    """tunelab's batched generate (left padding, longest first, KV cache) vs one `generate` call per prompt.

    Same model, tunelab's precision for this machine, greedy, same prompts; the two take turns for `rounds` rounds.
    """
    from tunelab.core.generation import generate
    from tunelab.core.inference import autocast

    spec = {"mode": "generate", "data": str(data), "warmup": 0, "timed": 1, "batch_size": args.batch_size,
            "max_length": args.max_length, "trainer": args.trainer}
    model, tokenizer, datamodule = build_data(compose(spec))
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    texts = [datamodule.formatter.generation_prompt(c.prompt) for c in datamodule.conversations("test")[:prompts]]
    device = next(model.parameters()).device

    def batched():
        return generate(model, tokenizer, texts, batch_size=16, max_new_tokens=new_tokens, precision="auto")

    @torch.no_grad()
    def one_by_one():
        out = []
        for text in texts:
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
            with autocast("auto", device):
                ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out

    result = {"prompts": len(texts), "max_new_tokens": new_tokens, "rounds": rounds, "seconds": {"batched": 0.0, "per_prompt": 0.0}}
    batched()  # warm-up
    for _ in range(rounds):
        for name, fn in (("batched", batched), ("per_prompt", one_by_one)):
            start = time.perf_counter()
            outputs = fn()
            result["seconds"][name] += time.perf_counter() - start
            result[name] = outputs
    result["new_tokens"] = {k: sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in result[k])
                            for k in ("batched", "per_prompt")}
    result["same_text"] = sum(a == b for a, b in zip(result["batched"], result["per_prompt"])) / len(texts)
    result["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return result


def print_generation(result: dict) -> None:
    rounds = result["seconds"]
    print(f"\ngeneration: {result['prompts']} prompts x up to {result['max_new_tokens']} new tokens, greedy, precision auto "
          f"(load {result['load']})")
    for name in ("batched", "per_prompt"):
        print(f"  {name:10s} {rounds[name]:7.2f} s in all  {result['new_tokens'][name] * result['rounds'] / rounds[name]:7.1f} new tok/s")
    print(f"  batched / per-prompt speed: {rounds['per_prompt'] / rounds['batched']:.2f}x; "
          f"identical outputs: {result['same_text']:.0%}")
