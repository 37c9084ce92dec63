"""Model loading, adapters and export.

The names below load on first use: the CLI's pre-flight reads `tunelab.models.hub`, which should not import torch
through this package."""

from importlib import import_module

__all__ = ["FullFineTuning", "apply_adapter", "build_tiny_llama", "count_parameters", "load_pretrained",
           "load_tokenizer"]
_HOMES = {"FullFineTuning": "adapters", "apply_adapter": "adapters", "count_parameters": "adapters",
          "load_pretrained": "loading", "load_tokenizer": "loading", "build_tiny_llama": "tiny"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"tunelab.models.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'tunelab.models' has no attribute {name!r}")
