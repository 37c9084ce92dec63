"""One LightningModule per objective over a shared base."""

from tunelab.methods.base import CausalLMModule, LanguageModelModule

__all__ = ["CausalLMModule", "LanguageModelModule"]
