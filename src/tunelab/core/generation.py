"""The one generation engine: batched greedy (or sampled) generation with left padding and the KV cache,
used by evaluation, the judge, chat and the benchmarks (HF `generate` today; a faster engine can fill
the same two functions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.core.inference import autocast
from tunelab.progress import progress_bar


@dataclass(frozen=True)
class Completion:
    text: str
    finished: bool     # ended with an end-of-turn/EOS token before max_new_tokens ran out
    new_tokens: int


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS of the tokenizer plus any the model's generation config adds (chat models often have several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 64,
                         precision: str | None = "auto", description: str = "generating", on_batch=None,
                         **sampling) -> list[Completion]:
    """A Completion for each prompt text, in order; longest prompts first to waste the least padding.

    `on_batch(indices, completions)` is called after every batch, so callers can save work as it comes."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[Completion | None] = [None] * len(prompts)
    stops = stop_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with progress_bar(description, len(prompts)) as progress:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                inputs = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)
                with autocast(precision, device):
                    tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                            eos_token_id=sorted(stops), **sampling)
                new = tokens[:, inputs["input_ids"].shape[1] :].tolist()
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                done = []
                for i, ids, text in zip(chunk, new, texts):
                    ended = next((n for n, t in enumerate(ids) if t in stops), None)
                    outputs[i] = Completion(text.strip(), ended is not None, len(ids) if ended is None else ended)
                    done.append(outputs[i])
                if on_batch is not None:
                    on_batch(chunk, done)
                progress.advance(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Completion texts for each prompt, in order (see generate_completions for the arguments)."""
    return [c.text for c in generate_completions(model, tokenizer, prompts, **kwargs)]
