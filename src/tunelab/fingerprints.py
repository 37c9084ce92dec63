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
