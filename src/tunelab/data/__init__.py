"""Data: formats, templates, tokenization with label masks, batching and the datamodule.

The names below load on first use: a leaf such as `tunelab.data.fingerprints`, read by the CLI before its
pre-flight, should not import Lightning through this package."""

from importlib import import_module

__all__ = ["DataModule", "DocumentTokenizer", "SupervisedTokenizer"]
_HOMES = {"DataModule": "tunelab.data.datamodule", "DocumentTokenizer": "tunelab.data.tokenize",
          "SupervisedTokenizer": "tunelab.data.tokenize"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'tunelab.data' has no attribute {name!r}")
