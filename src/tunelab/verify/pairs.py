"""The pairs: two short trainings (or a model and its export) that must agree, and by how much they do.

Each pair is a function (context) -> PairResult. A pair that does not apply to the config is
SKIP with the reason, never PASS.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from tunelab.run.compose import compose_job
from tunelab.verify.runner import build_parts, max_relative_gap, short_fit

PASS, FAIL, SKIP = "pass", "FAIL", "skip"


@dataclass
class PairResult:
    name: str
    status: str
    measured: dict[str, float] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASS


@dataclass
class Context:
    """The user's overrides, the verify settings, and a scratch folder for the trainings."""

    overrides: list[str]
    settings: DictConfig
    work_dir: Path
    traits: dict | None = None  # module_traits(), once known

    def overrides_for(self, *extra: str, steps: int | None = None, single_process: bool = True) -> list[str]:
        """The user's overrides with the pair's own on top (a later value of a key replaces an earlier one)."""
        s = self.settings
        ours = [f"trainer.max_steps={steps or s.steps}", "trainer.max_epochs=-1", "trainer.limit_val_batches=0",
                "logger=none", f"data.max_train_examples={s.max_train_examples}"]
        if s.tiny:
            ours.append("model=tiny_llama")
        if s.max_length:
            ours.append(f"data.max_length={s.max_length}")
        if s.precision:
            ours.append(f"trainer.precision={s.precision}")
        if single_process:
            ours += ["trainer.strategy=auto", "trainer.devices=1"]
        return merge_overrides(self.overrides, ours, list(extra))

    def cfg(self, overrides: list[str], name: str) -> tuple[DictConfig, Path]:
        run_dir = self.work_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        return compose_job("train", overrides, run_dir), run_dir

    def module_traits(self) -> dict:
        """What the method's module says of itself, built once as training builds it: `manual` (its name when it
        steps the optimizer itself: PPO, GRPO, RLOO under Lightning's manual optimization, where Lightning
        accumulates nothing) and `accumulation_differs` (why batch B x k is another objective than B*k, if it is)."""
        if self.traits is None:
            cfg, _ = self.cfg(self.overrides_for(), "probe")
            module, _ = build_parts(cfg)
            name = str(cfg.method.get("name") or "this method")
            self.traits = {"name": name, "manual": None if module.automatic_optimization else name,
                           "accumulation_differs": getattr(module, "accumulation_differs", None),
                           "steps_per_batch": int(getattr(module, "updates_per_rollout", lambda: 1)())}
        return self.traits

    def manual_optimization(self) -> str | None:
        return self.module_traits()["manual"]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: list[str]) -> list[str]:
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged.pop(override_key(override), None)
            merged[override_key(override)] = override
    return list(merged.values())


def judge(name: str, measured: dict[str, float], tolerance: dict[str, float], note: str = "") -> PairResult:
    over = [k for k, v in measured.items() if not v <= tolerance.get(k, math.inf)]
    if over:
        gaps = ", ".join(f"{k} differs by {measured[k]:.3g} > {tolerance[k]:.3g}" for k in over)
        return PairResult(name, FAIL, measured, tolerance, f"{gaps}. {note}".strip())
    return PairResult(name, PASS, measured, tolerance, note)


def tolerances(ctx: Context, name: str) -> dict[str, float]:
    return {k: float(v) for k, v in ctx.settings.tolerance[name].items()}


def seeded(ctx: Context) -> PairResult:
    """The same config and seed twice: per-step losses and grad norms must repeat."""
    overrides = ctx.overrides_for()
    a = short_fit(*ctx.cfg(overrides, "seeded_a"))
    b = short_fit(*ctx.cfg(overrides, "seeded_b"))
    measured = {"loss": max_relative_gap(a.losses, b.losses), "grad_norm": max_relative_gap(a.grad_norms, b.grad_norms)}
    return judge("seeded run twice", measured, tolerances(ctx, "seeded"), f"{len(a.losses)} steps each")


def accumulation(ctx: Context) -> PairResult:
    """Batch B with accumulation k against batch B*k, same examples per step (length grouping off)."""
    batch, k = int(ctx.settings.batch_size), int(ctx.settings.accumulate)
    name = f"batch {batch} x accum {k} vs batch {batch * k}"
    traits = ctx.module_traits()
    if traits["manual"]:
        return PairResult(name, SKIP, note=f"method={traits['manual']} steps its optimizer itself (manual optimization), "
                                           "so trainer.accumulate_grad_batches does not apply to it")
    if traits["accumulation_differs"]:
        return PairResult(name, SKIP, note=f"method={traits['name']}: {traits['accumulation_differs']}")
    common = ["data.group_by_length=false"]  # grouping sorts within megabatches sized by the batch, so orders differ
    a = short_fit(*ctx.cfg(ctx.overrides_for(*common, f"data.batch_size={batch}",
                                             f"trainer.accumulate_grad_batches={k}"), "accumulation_a"))
    b = short_fit(*ctx.cfg(ctx.overrides_for(*common, f"data.batch_size={batch * k}",
                                             "trainer.accumulate_grad_batches=1"), "accumulation_b"))
    measured = {"loss": max_relative_gap(a.losses, b.losses), "grad_norm": max_relative_gap(a.grad_norms, b.grad_norms)}
    return judge(name, measured, tolerances(ctx, "accumulation"), f"{len(a.losses)} steps")


def resume(ctx: Context) -> PairResult:
    """N steps, checkpoint, fresh objects resume for N more, against 2N uninterrupted (at batch B x k,
    so the checkpoint falls inside an accumulation group's epoch and the run crosses an epoch boundary). A method
    that steps its optimizer itself resumes at batch B (accumulation does not apply to it)."""
    n, batch, k = int(ctx.settings.steps), int(ctx.settings.batch_size), int(ctx.settings.accumulate)
    k = 1 if ctx.manual_optimization() else k
    # An on-policy batch (one rollout) makes several optimizer steps and a checkpoint falls between rollouts
    # only: N counts rollouts there.
    n *= ctx.module_traits()["steps_per_batch"]
    overrides = ctx.overrides_for(f"data.batch_size={batch}", f"trainer.accumulate_grad_batches={k}", steps=2 * n)
    whole = short_fit(*ctx.cfg(overrides, "resume_whole"))
    cfg, first_dir = ctx.cfg(overrides, "resume_first")
    first = short_fit(cfg, first_dir, stop_after=n, save_every=n)
    checkpoint = first_dir / "checkpoints" / f"step={n}.ckpt"
    if not checkpoint.is_file():
        written = sorted(p.name for p in (first_dir / "checkpoints").glob("*.ckpt"))
        return PairResult("resume vs uninterrupted", FAIL, note=f"no checkpoint was written at step {n} "
                                                                f"(written: {', '.join(written) or 'none'})")
    second = short_fit(*ctx.cfg(overrides, "resume_second"), ckpt_path=str(checkpoint))
    measured = {"loss": max_relative_gap(whole.losses, first.losses[:n] + second.losses),
                "lr": max_relative_gap(whole.lrs, first.lrs[:n] + second.lrs)}
    epoch_steps = len(whole.datamodule.train_dataloader()) // max(1, int(whole.datamodule.accumulate_grad_batches))
    return judge("resume vs uninterrupted", measured, tolerances(ctx, "resume"),
                 f"{n}+{len(second.losses)} vs {len(whole.losses)} steps; an epoch is ~{epoch_steps} steps")


def merge(ctx: Context) -> PairResult:
    """The adapter model in `final/` against the LoRA-merged model in `merged/`, both loaded from disk."""
    from tunelab.models.adapters import is_peft

    cfg, run_dir = ctx.cfg(ctx.overrides_for(), "merge")
    if str(cfg.adapter.get("_target_", "")).endswith("FullFineTuning"):
        return PairResult("adapter vs merged", SKIP, note="adapter=full trains every weight: there is nothing to merge")
    trace = short_fit(cfg, run_dir)
    model = trace.module.model
    if not is_peft(model):
        return PairResult("adapter vs merged", SKIP, note="the model carries no PEFT adapter: there is nothing to merge")
    measured = compare_exports(cfg, run_dir, model, trace.datamodule, int(ctx.settings.merge_batches))
    return judge("adapter vs merged", measured, tolerances(ctx, "merge"), "final/ and merged/ loaded from disk")


def compare_exports(cfg: DictConfig, run_dir: Path, model, datamodule, batches: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.core.losses import token_loss_sum
    from tunelab.models.export import save_final, save_merged
    from tunelab.run.train import base_model_path

    tokenizer = datamodule.tokenizer
    save_final(model, tokenizer, run_dir / "final", base_model_path(cfg, model, run_dir))
    probe = next(iter(datamodule.loader("train", train=False, shard=False)))
    probe = {k: probe[k] for k in ("input_ids", "attention_mask")}
    save_merged(model, tokenizer, run_dir / "merged", probe, math.inf)  # measured below, from disk
    adapter = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    gap, sums = 0.0, {"adapter": [0.0, 0], "merged": [0.0, 0]}
    with torch.no_grad():
        for index, batch in enumerate(datamodule.loader("val" if datamodule.datasets["val"].rows else "train",
                                                        train=False, shard=False)):
            if index >= batches:
                break
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            logits = {"adapter": adapter(**inputs).logits, "merged": merged(**inputs).logits}
            mask = batch["attention_mask"].bool()
            gap = max(gap, (logits["adapter"] - logits["merged"]).abs()[mask].max().item())
            for name, value in logits.items():
                loss, count = token_loss_sum(value, batch["labels"])
                sums[name][0] += loss.item()
                sums[name][1] += int(count)
    ppl = {name: math.exp(total / max(count, 1)) for name, (total, count) in sums.items()}
    return {"logits": gap, "perplexity": abs(ppl["adapter"] - ppl["merged"]) / ppl["adapter"]}


def ddp(ctx: Context) -> PairResult:
    """2 processes at batch B against 1 process at batch 2B: the same global batch, the same losses."""
    devices, batch = int(ctx.settings.ddp_devices), int(ctx.settings.batch_size)
    single = short_fit(*ctx.cfg(ctx.overrides_for(f"data.batch_size={batch * devices}",
                                                  "trainer.accumulate_grad_batches=1"), "ddp_single"))
    overrides = ctx.overrides_for(f"data.batch_size={batch}", "trainer.accumulate_grad_batches=1",
                                  "trainer.strategy=ddp", f"trainer.devices={devices}", single_process=False)
    try:
        multi = run_worker(overrides, ctx.work_dir / "ddp_multi", float(ctx.settings.ddp_timeout_s))
    except RuntimeError as err:
        return PairResult(f"DDP {devices} procs vs 1", FAIL, note=str(err))
    measured = {"loss": max_relative_gap(single.losses, multi["losses"]),
                "grad_norm": max_relative_gap(single.grad_norms, multi["grad_norms"]),
                "batches": differing_global_batches(ctx, single.datamodule.tokenizer, batch, devices)}
    return judge(f"DDP {devices} procs vs 1", measured, tolerances(ctx, "ddp"),
                 f"global batch {batch * devices}, {len(single.losses)} steps")


def differing_global_batches(ctx: Context, tokenizer, batch: int, devices: int) -> float:
    """Share of global batches whose examples differ between N ranks at B and 1 process at N*B, over
    the whole training split for two epochs (the short trainings see too few examples to show it)."""
    from tunelab.data.batching import StepBatchSampler
    from tunelab.run.assemble import build_datamodule

    cfg, _ = ctx.cfg(ctx.overrides_for("data.max_train_examples=null"), "ddp_sampler")
    datamodule = build_datamodule(cfg, tokenizer)
    dataset, differ, total = datamodule.datasets["train"], 0, 0
    for epoch in range(2):
        one = StepBatchSampler(dataset, batch * devices, seed=datamodule.seed, group_by_length=datamodule.group_by_length)
        ranks = StepBatchSampler(dataset, batch, seed=datamodule.seed, group_by_length=datamodule.group_by_length)
        ranks.world = lambda: (0, devices)  # the grouping every rank computes (each then takes its shard)
        one.set_epoch(epoch), ranks.set_epoch(epoch)
        # A last global batch with fewer examples than ranks exists only for the single process.
        a = [sorted(b[0]) for b in one.global_batches() if len(b[0]) >= devices]
        b = [sorted(j for shard in group for j in shard) for group in ranks.global_batches()]
        differ += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        total += max(len(a), len(b))
    return differ / max(total, 1)


def run_worker(overrides: list[str], run_dir: Path, timeout: float) -> dict:
    """A short fit in a fresh process (Lightning launches the other ranks by re-running it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "trace.json"
    command = [sys.executable, "-m", "tunelab.verify.worker", str(out), str(run_dir), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"the multi-process run failed (exit {done.returncode}): {' | '.join(tail)}")
    return json.loads(out.read_text())


def packing(ctx: Context) -> PairResult:
    """The same training examples as one row each and packed (data.packing=true, per-document attention):
    the same per-token losses, loss sum and gradients, with the config's model, adapter and method module."""
    name = "packed vs unpacked"
    cfg, _ = ctx.cfg(ctx.overrides_for("data.packing=false"), "packing")
    target = str((cfg.method.get("tokenization") or {}).get("_target_", ""))
    if not target.endswith(("SupervisedTokenizer", "DocumentTokenizer")):
        return PairResult(name, SKIP, note=f"packing is for sft/pretrain, not {cfg.method.name}")
    measured, note = packed_vs_unpacked(cfg, int(ctx.settings.batch_size) * int(ctx.settings.accumulate))
    return judge(name, measured, tolerances(ctx, "packing"), note)


def packed_vs_unpacked(cfg: DictConfig, examples: int) -> tuple[dict[str, float], str]:
    """One loss and backward over `examples` training rows, unpacked then packed in the same order."""
    import torch

    from tunelab.data.packing import pack_in_order
    from tunelab.run.assemble import assemble, finalize

    parts = assemble(finalize(cfg))
    module, datamodule = parts.module, parts.datamodule
    rows = datamodule.datasets["train"].rows[:examples]
    packed = pack_in_order(rows, datamodule.max_length)
    collate = datamodule.collator
    unpacked_batch, packed_batch = collate([dict(r) for r in rows]), collate([dict(r) for r in packed])
    module.levers.apply(module, cfg.trainer.precision)  # the runtime levers as training has them
    module.model.eval()  # no dropout: both sides must see the same network
    try:
        a, b = loss_tokens_grads(module, unpacked_batch, cfg), loss_tokens_grads(module, packed_batch, cfg)
    finally:
        module.levers.restore()
        module.model.train()
    grad_gap = torch.linalg.vector_norm(b["grads"] - a["grads"]) / torch.linalg.vector_norm(a["grads"]).clamp(min=1e-30)
    measured = {"loss": abs(b["loss"] - a["loss"]) / max(abs(a["loss"]), 1e-30),
                "token_loss": float((b["token_losses"] - a["token_losses"]).abs().max()),
                "grad_norm": float(grad_gap)}
    if a["tokens"] != b["tokens"]:
        measured["tokens"] = float(abs(a["tokens"] - b["tokens"]))
    note = (f"{len(rows)} examples in {len(rows)} rows ({unpacked_batch['input_ids'].numel()} token slots) vs "
            f"{len(packed)} packed rows ({packed_batch['input_ids'].numel()}); {a['tokens']} supervised tokens; "
            "grad_norm: relative norm of the gradient difference")
    return measured, note


def loss_tokens_grads(module, batch: dict, cfg: DictConfig) -> dict:
    """The module's loss sum and gradients on one batch, and the per-token losses of the full logits, in the
    order of the supervised tokens (the same order unpacked and packed in order)."""
    import torch

    from tunelab.core.inference import autocast
    from tunelab.core.losses import model_inputs, model_labels

    module.zero_grad(set_to_none=True)
    device = module.device
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast(cfg.trainer.precision, device):
        loss_sum, tokens = module.loss_sum(batch)
        loss_sum.backward()
        with torch.no_grad():
            logits = module.model(**model_inputs(module.model, batch)).logits[:, :-1].float()
    targets = model_labels(module.model, batch)[:, 1:]
    supervised = targets != -100
    token_losses = torch.nn.functional.cross_entropy(logits[supervised], targets[supervised], reduction="none")
    grads = torch.cat([p.grad.detach().float().flatten() for p in module.parameters() if p.grad is not None])
    return {"loss": loss_sum.item(), "tokens": int(tokens), "token_losses": token_losses.cpu(), "grads": grads.cpu()}


PAIRS: dict[str, Callable[[Context], PairResult]] = {
    "seeded": seeded,
    "accumulation": accumulation,
    "resume": resume,
    "merge": merge,
    "packing": packing,
    "ddp": ddp,
}


def run_pairs(overrides: list[str], settings: DictConfig, work_dir: Path | None = None,
              on_result: Callable[[PairResult], None] | None = None) -> list[PairResult]:
    """Run the pairs named in settings.pairs, in that order."""
    from tunelab.errors import TunelabError

    unknown = [name for name in settings.pairs if name not in PAIRS]
    if unknown:
        raise TunelabError(f"unknown verify pair(s) {', '.join(unknown)}; choose from {', '.join(PAIRS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="tunelab-verify-") as tmp:
        ctx = Context(list(overrides), settings, Path(work_dir or tmp))
        for name in settings.pairs:
            result = PAIRS[name](ctx)
            results.append(result)
            if on_result:
                on_result(result)
    return results
