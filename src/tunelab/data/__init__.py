"""Data: formats, templates, tokenization with label masks, batching and the datamodule."""

from tunelab.data.datamodule import DataModule
from tunelab.data.tokenize import DocumentTokenizer, SupervisedTokenizer

__all__ = ["DataModule", "DocumentTokenizer", "SupervisedTokenizer"]
