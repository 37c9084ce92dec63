"""tunelab: Hydra-composed fine-tuning of causal language models on PyTorch Lightning."""

__version__ = "0.1.0"
