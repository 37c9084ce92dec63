"""Load a pretrained causal LM and its tokenizer: the embedded model, a local folder or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models.embedded import embedded_model_dir, is_embedded
from tunelab.models.hub import looks_like_path


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for embedded and local models; hub ids pass through unchanged."""
    name_or_path = str(name_or_path)
    if is_embedded(name_or_path):
        return str(embedded_model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise TunelabError(f"model folder {path} has no config.json; point model.name_or_path at an HF model folder")
        return str(path)
    if looks_like_path(name_or_path):
        raise TunelabError(
            f"model path {name_or_path} does not exist; use model.name_or_path=PATH to an HF folder, "
            "a hub id, or model=smollm2_135m for the embedded default"
        )
    return name_or_path


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise TunelabError(f"cannot load a tokenizer from '{name_or_path}' ({first_line(err)})") from err
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss by their labels, not by token id,
        # so reusing EOS as pad never hides the EOS the model must learn to emit.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_pretrained(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """(model, tokenizer) from an `embedded:NAME`, a local HF folder, or a hub id."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if needs_peft_loader(path):
        return load_through_peft(path, dtype, attn_implementation), load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
    except OSError as err:
        raise TunelabError(
            f"cannot load model '{name_or_path}' ({first_line(err)}); offline machines need a local folder "
            "or the embedded model (model=smollm2_135m)"
        ) from err
    return model, load_tokenizer(name_or_path)


def needs_peft_loader(path: str) -> bool:
    """An adapter folder that transformers' own PEFT integration misreads: with transformers 5.23 and peft 0.21
    it looks for DoRA's magnitude vectors under another key and silently starts them afresh."""
    import json
    from pathlib import Path

    config = Path(path) / "adapter_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("use_dora"))


def load_through_peft(path: str, dtype: str, attn_implementation: str | None):
    """The adapter folder loaded by PEFT itself and merged: a plain causal LM, as transformers would give."""
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                    attn_implementation=attn_implementation).merge_and_unload()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
