"""Content hashes of what shapes the tokens a model sees: raw records, tokenizer, template, settings.

One place for them, so the data cache key, the run manifest and the fidelity gate agree on what
"the same tokenizer" means."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def digest(*parts) -> str:
    """sha256 of a canonical JSON rendering (sorted keys; anything unknown as its repr)."""
    text = json.dumps(parts, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def records_fingerprint(splits: dict[str, list[dict]]) -> str:
    """The raw records of every split, by content (not by file name or path)."""
    return digest({name: records for name, records in sorted(splits.items())})


def chat_template_fingerprint(tokenizer) -> str:
    return digest(getattr(tokenizer, "chat_template", None))


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normaliser and special tokens as loaded (pad set at load time included).

    Hashes the tokenizer's serialised state rather than files on disk, so a tokenizer edited in
    memory, or the same files in another folder, hash as what they are."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Padding and truncation are call-time settings (generation pads left, training right), not the vocabulary.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        state = sorted(tokenizer.get_vocab().items())
    special = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return digest(type(tokenizer).__name__, state, special, sorted(map(str, tokenizer.all_special_tokens)))


def template_fingerprint(tokenizer, template: str) -> str:
    """What renders a conversation to text: the prompt template, or the tokenizer's chat template."""
    return digest(template, chat_template_fingerprint(tokenizer) if template == "chat" else None)


def parameter_name(name: str) -> str:
    """A PEFT-wrapped weight's name as the plain model calls it (base_model.model.x.base_layer.weight -> x.weight)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def is_adapter_weight(name: str) -> bool:
    return "lora_" in name


def adapter_is_identity(state: dict) -> bool:
    """A LoRA whose every B matrix is zero adds exactly nothing: a freshly attached adapter computes the base model."""
    b_weights = [t for n, t in state.items() if "lora_B" in n or "lora_embedding_B" in n]
    return bool(b_weights) and all(not t.any() for t in b_weights)


def model_fingerprint(model) -> str:
    """The function a model computes, by its weights' names, dtypes, shapes and bytes.

    A freshly attached LoRA is left out (it is the identity), and PEFT's names are mapped to the plain
    model's, so a study's base model hashes the same under full fine-tuning, under LoRA at any seed and
    when `tunelab-evaluate` loads it alone: its harness scores are computed once."""
    import torch

    state = model.state_dict()
    skip_adapter = adapter_is_identity(state)
    sha = hashlib.sha256()
    for name in sorted(state, key=parameter_name):
        if skip_adapter and is_adapter_weight(name):
            continue
        tensor = state[name].detach().to("cpu").contiguous()
        sha.update(f"{parameter_name(name)}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()
