"""Model loading, adapters and export."""

from tunelab.models.adapters import FullFineTuning, apply_adapter, count_parameters
from tunelab.models.loading import load_pretrained, load_tokenizer
from tunelab.models.tiny import build_tiny_llama

__all__ = [
    "FullFineTuning",
    "apply_adapter",
    "build_tiny_llama",
    "count_parameters",
    "load_pretrained",
    "load_tokenizer",
]
