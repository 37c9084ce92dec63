"""Batched greedy (or sampled) generation with left padding and the KV cache."""

from __future__ import annotations

import contextlib

import torch
from rich.progress import Progress


def autocast(precision: str | None, device: torch.device):
    if precision in ("bf16", "bf16-mixed", "bfloat16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16", "16-mixed", "fp16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 64,
             precision: str | None = "bf16", description: str = "generating", **sampling) -> list[str]:
    """Completions for each prompt text, in order; longest prompts first to waste the least padding."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task(description, total=len(prompts))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                inputs = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)
                with autocast(precision, device):
                    tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                            eos_token_id=tokenizer.eos_token_id, **sampling)
                new = tokens[:, inputs["input_ids"].shape[1] :]
                for i, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    outputs[i] = text.strip()
                progress.advance(task, len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
