"""The speed and memory knobs every method shares (the `runtime` config group), applied to any method's
LightningModule by the assembler, each keyed on the precision that actually runs and each checked to
give the plain path's loss and gradients (tests/test_speed_equivalence.py):

- gradient_checkpointing: recompute activations in backward (~1/3 more compute, far less memory);
- frozen_weights_dtype (auto: bf16 exactly under bf16-mixed): frozen Linear weights stored as the bf16
  copies autocast would make each step (same math, half their memory, no per-step casts);
- cast_inputs_once: under autocast, one cast of each attention/MLP block's input for all its
  projections instead of one per projection (same forward values, less memory and copying);
- chunked_loss: the LM head and its cross-entropy over loss_chunk_size tokens at a time, never the whole
  [tokens x vocab] logits (core.losses; sft, pretrain, the preference family, core.logprobs.token_logps);
- compile: torch.compile of each decoder layer while training (the layers' parameter names stay).
Under 32-true (AVX2 CPUs) frozen_weights_dtype and cast_inputs_once do nothing, so they can never slow an fp32 run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.core.losses import CHUNK_ATTRIBUTE
from tunelab.errors import TunelabError
from tunelab.models.qlora import is_4bit_layer

MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")


def frozen_linear_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Linear layers whose weights never train and are used by nothing else (a tied embedding is kept)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    # bitsandbytes' Linear4bit is an nn.Linear whose weight is packed 4-bit data (adapter=qlora): not one of these
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not is_4bit_layer(m)
            and not any(p.requires_grad or uses[id(p)] > 1 for p in m.parameters(recurse=False))]


class LowPrecisionFrozenWeights:
    """Frozen Linear weights held in `dtype` (bf16) instead of fp32 while training under bf16 autocast.

    Autocast casts every fp32 weight to bf16 for each matmul (a fresh copy per step, kept alive for
    backward); a frozen weight can be stored as that very copy: the same math, half the weight memory
    and no per-step casts. Outside autocast the layer casts its input to the weight's dtype and its
    output back, so nothing breaks. `restore()` returns the weights to their dtype (at bf16 precision).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.layers = frozen_linear_layers(model)
        self.dtypes = [m.weight.dtype for m in self.layers]
        self.hooks = []
        for layer in self.layers:
            layer.to(dtype)
            self.hooks.append(layer.register_forward_pre_hook(self._cast_input))
            self.hooks.append(layer.register_forward_hook(self._cast_output))
        if self.layers:
            # from_pretrained's weights are views of the checkpoint's memory map, whose pages stay
            # resident while any view lives: the other frozen weights (embedding, norms) are copied
            # out of it too, so the map and its fp32 pages go.
            lowered = {id(p) for layer in self.layers for p in layer.parameters(recurse=False)}
            for p in model.parameters():
                if id(p) not in lowered and not p.requires_grad:
                    p.data = p.data.clone()

    @staticmethod
    def _cast_input(layer, args):
        x = args[0]
        if torch.is_autocast_enabled(x.device.type) or x.dtype == layer.weight.dtype:
            return None
        layer._tunelab_input_dtype = x.dtype
        return (x.to(layer.weight.dtype), *args[1:])

    @staticmethod
    def _cast_output(layer, args, output):
        dtype = layer.__dict__.pop("_tunelab_input_dtype", None)
        return output.to(dtype) if dtype is not None else None

    def restore(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for layer, dtype in zip(self.layers, self.dtypes):
            layer.to(dtype)
        self.layers, self.hooks = [], []


class CastInputsOnce:
    """Under autocast, each attention and MLP block gets its input cast to the autocast dtype once.

    Plain autocast casts the (fp32) normalised hidden state separately for every projection that
    reads it (q, k, v; gate, up; and again for each LoRA A), and PEFT casts bf16 inputs up to its
    fp32 LoRA weights first; every copy is kept for backward. One cast feeds them all: the same
    forward values, less memory and copying (gradients summed in bf16: bf16 tolerance).
    """

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.lora import LoraLayer

        self.hooks = [m.register_forward_pre_hook(self._cast, with_kwargs=True) for name, m in model.named_modules()
                      if name.rsplit(".", 1)[-1] in ("self_attn", "mlp")]
        self.lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
        for layer in self.lora:
            layer.cast_input_dtype_enabled = False  # autocast casts for LoRA A itself

    @staticmethod
    def _cast(block, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
            return None
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype == dtype or not x.is_floating_point():
            return None
        if args:
            return (x.to(dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x.to(dtype)}

    def restore(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for layer in self.lora:
            layer.cast_input_dtype_enabled = True
        self.hooks, self.lora = [], []


def frozen_weights_dtype_for(setting: str | None, precision: str) -> torch.dtype | None:
    """The storage dtype of frozen weights: `auto` is bf16 exactly when training runs bf16 autocast."""
    if setting in (None, "none", "float32", "fp32"):
        return None
    if setting == "auto":
        return torch.bfloat16 if str(precision) == "bf16-mixed" else None
    if setting in ("bfloat16", "bf16"):
        if str(precision) != "bf16-mixed":
            raise TunelabError(f"runtime.frozen_weights_dtype={setting} needs trainer.precision=bf16-mixed "
                               f"(got {precision}); use auto or null")
        return torch.bfloat16
    raise TunelabError(f"runtime.frozen_weights_dtype must be auto, bfloat16 or null, got {setting!r}")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers decoder (plain or PEFT-wrapped): the unit torch.compile gets."""
    from transformers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class CompiledLayers:
    """torch.compile of each decoder layer, in place (`nn.Module.compile`): one graph per layer kind, reused by
    every layer, and the state dict keeps its names (checkpoints, export and LoRA merge see nothing). The whole
    model is not compiled: the loss, packing and Lightning hooks stay eager (as torchtune and prime-rl do)."""

    def __init__(self, model: torch.nn.Module, backend: str = "inductor", mode: str | None = None,
                 dynamic: bool | None = None):
        self.layers = decoder_layers(model)
        if not self.layers:
            raise TunelabError(f"runtime.compile=true: no decoder layers found in {type(model).__name__} to compile; "
                               "set runtime.compile=false")
        for layer in self.layers:
            layer.compile(backend=backend, mode=mode, dynamic=dynamic)

    def restore(self) -> None:
        for layer in self.layers:
            layer._compiled_call_impl = None  # back to eager: evaluation and generation after training
        self.layers = []


class ChunkedLoss:
    """runtime.chunked_loss: marks the model so every token loss runs its LM head in chunks (core.losses)."""

    def __init__(self, model: torch.nn.Module, chunk_size: int):
        if int(chunk_size) < 1:
            raise TunelabError(f"runtime.loss_chunk_size must be a positive number of tokens, got {chunk_size}")
        self.model = model
        setattr(model, CHUNK_ATTRIBUTE, int(chunk_size))

    def restore(self) -> None:
        self.model.__dict__.pop(CHUNK_ATTRIBUTE, None)


@dataclass
class RuntimeLevers:
    """The runtime group's settings on one module; applied when fit starts, undone when it ends."""

    gradient_checkpointing: bool = False
    frozen_weights_dtype: str | None = "auto"
    cast_inputs_once: bool = True
    chunked_loss: bool = False
    loss_chunk_size: int = 1024
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    compile_dynamic: bool | None = None

    def __post_init__(self):
        self.low_precision: LowPrecisionFrozenWeights | None = None
        self.cast_once: CastInputsOnce | None = None
        self.chunked: ChunkedLoss | None = None
        self.compiled: CompiledLayers | None = None

    def apply(self, module: torch.nn.Module, precision) -> None:
        dtype = frozen_weights_dtype_for(self.frozen_weights_dtype, precision)
        if dtype is not None and self.low_precision is None:
            self.low_precision = LowPrecisionFrozenWeights(module, dtype)
        mixed = str(precision) in MIXED_PRECISIONS  # the cast hooks only act under autocast
        if self.cast_inputs_once and mixed and self.cast_once is None:
            self.cast_once = CastInputsOnce(module)
        if self.chunked_loss and self.chunked is None:
            self.chunked = ChunkedLoss(module.model, self.loss_chunk_size)
        if self.compile and self.compiled is None:
            self.compiled = CompiledLayers(module.model, self.compile_backend, self.compile_mode, self.compile_dynamic)

    def restore(self) -> None:
        for lever in ("chunked", "compiled"):
            if getattr(self, lever) is not None:
                getattr(self, lever).restore()
                setattr(self, lever, None)
        if self.low_precision is not None:
            self.low_precision.restore()
            self.low_precision = None
        if self.cast_once is not None:
            self.cast_once.restore()
            self.cast_once = None


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TunelabError(f"runtime.gradient_checkpointing=true: {type(model).__name__} has no gradient "
                           "checkpointing; set runtime.gradient_checkpointing=false")
    # Non-reentrant checkpointing needs no input grads, so it also works with a frozen embedding (LoRA);
    # training mode is what switches it on in transformers.
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def apply_runtime(module, runtime) -> None:
    """Give a method's module the runtime group's settings (None: the defaults)."""
    settings = dict(runtime or {})
    settings.pop("threads", None)  # process-wide, not a module's: platform.threads set it when the run was finalized
    module.levers = RuntimeLevers(**settings)
    if module.levers.gradient_checkpointing:
        enable_gradient_checkpointing(module.model)
