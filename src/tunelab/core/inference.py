"""Running a model without training it: autocast for a precision setting, and one inference context
(eval mode, no gradients, autocast, and the model's mode restored however the block ends)."""

from __future__ import annotations

import contextlib

import torch

from tunelab.platform.hardware import autocast_dtype


def autocast(precision: str | None, device: torch.device):
    """Autocast for a precision setting (`auto`, `bf16-mixed`, `32-true`, ...) on `device`."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def inference(model: torch.nn.Module, precision: str | None = "auto"):
    """Eval mode, no gradients and the precision's autocast on the model's device; training mode back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(precision, next(model.parameters()).device):
            yield model
    finally:
        model.train(was_training)
