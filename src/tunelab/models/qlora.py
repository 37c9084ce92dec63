"""adapter=qlora: LoRA over a bitsandbytes 4-bit (NF4/FP4) base, and its dequantise-then-merge export.

The base is quantised the way transformers does it for QLoRA (`BitsAndBytesConfig` + `from_pretrained`,
then PEFT's `prepare_model_for_kbit_training`): every nn.Linear of the body becomes a bitsandbytes
`Linear4bit`, the output head, tied embeddings and the last module stay in full precision.

What the export must get right (each was measured to matter, see README, Adapters):
- the 4-bit layers compute in the training precision (fp32 under 32-true), not bf16;
- on CPUs with AVX512-BF16, bitsandbytes 0.50 swaps a 4-bit layer to a bf16 inference kernel whenever
  it runs in eval mode without grad, even with an fp32 compute dtype; that path is switched off, so
  evaluation and the merge gate see the function training optimised;
- `merged/` and `base_model/` hold the *dequantised* weights (never the original full-precision ones,
  which the adapter never saw), and LoRA is merged into those fp32 weights; PEFT's own merge into a
  Linear4bit re-quantises the sum, which is not the adapter's function.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from tunelab.errors import TunelabError

INSTALL = "pip install 'tunelab[qlora]'"
MIN_BITSANDBYTES = "0.45"
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QLoRA:
    """The adapter group of adapter=qlora: PEFT's LoraConfig plus how the base is quantised."""

    lora: object  # peft.LoraConfig
    quant_type: str = "nf4"
    compute_dtype: str = "auto"  # auto: the dtype training computes in (trainer.precision)
    double_quant: bool = True
    device: str | None = None  # where the base is quantised: set from the trainer by `for_trainer`

    def for_trainer(self, trainer_cfg) -> QLoRA:
        """This spec with `auto` made concrete for the trainer that will run it."""
        from tunelab.platform.hardware import training_device
        from tunelab.platform.sharding import uses_fsdp

        if uses_fsdp(trainer_cfg):
            raise TunelabError("adapter=qlora with trainer=fsdp is not built (FSDP would shard packed 4-bit weights); "
                               "use trainer=ddp or one device")
        dtype = self.compute_dtype
        if dtype == "auto":
            dtype = precision_dtype(trainer_cfg.get("precision"))
        return replace(self, compute_dtype=dtype, device=training_device(trainer_cfg).type)

    def bnb_config(self):
        from transformers import BitsAndBytesConfig

        dtype = "float32" if self.compute_dtype == "auto" else self.compute_dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPES[dtype],
                                  bnb_4bit_use_double_quant=self.double_quant)


def precision_dtype(precision) -> str:
    """The dtype a Lightning precision computes matmuls in: 32-true -> float32, bf16-mixed -> bfloat16, ..."""
    text = str(precision or "32-true")
    if text.startswith("bf16"):
        return "bfloat16"
    if text.startswith("16"):
        return "float16"
    return "float32"


def import_bitsandbytes():
    """bitsandbytes, or one line naming what is needed."""
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or a native library that fails to load
        raise TunelabError(f"adapter=qlora needs bitsandbytes>={MIN_BITSANDBYTES} ({INSTALL}); here it cannot be "
                           f"imported ({first_line(err)}); use adapter=lora") from None
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(MIN_BITSANDBYTES):
        raise TunelabError(f"adapter=qlora needs bitsandbytes>={MIN_BITSANDBYTES} ({INSTALL}); here it is "
                           f"{bitsandbytes.__version__}; use adapter=lora")
    return bitsandbytes


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_4bit_layer(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def count_4bit_layers(model: torch.nn.Module) -> int:
    return sum(is_4bit_layer(m) for m in model.modules())


def is_4bit(model: torch.nn.Module) -> bool:
    """A model (PEFT-wrapped or not) whose base holds bitsandbytes 4-bit layers."""
    return any(is_4bit_layer(m) for m in model.modules())


def quantize(model, spec: QLoRA):
    """`model` with its body's Linear layers in 4-bit, prepared for k-bit training (everything frozen).

    Why save + from_pretrained instead of swapping nn.Linear for Linear4bit in place: the model groups build
    models in memory (the tiny model, a reward head added by the method), and transformers' quantiser is the
    maintained code that decides which layers to keep (output head, tied embeddings, the last module), builds
    the Linear4bit layers, quantises each weight as it loads and marks the model `is_loaded_in_4bit` (which
    PEFT reads to pick its 4-bit LoRA layer). Going through a temporary checkpoint reuses all of it for any
    transformers model; the cost is one write and read of the full-precision weights."""
    import tempfile

    from peft import prepare_model_for_kbit_training
    from transformers import PreTrainedModel

    import_bitsandbytes()
    if not isinstance(model, PreTrainedModel):
        raise TunelabError(f"adapter=qlora quantises a transformers model; {type(model).__name__} is not one "
                           "(a sentence-transformers model, method=contrastive); use adapter=lora")
    kwargs = {"device_map": {"": "cpu"}} if spec.device == "cpu" else {}  # else transformers' choice: the GPU
    attn = getattr(model.config, "_attn_implementation", None)
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        with tempfile.TemporaryDirectory(prefix="tunelab-qlora-") as folder:
            model.save_pretrained(folder)
            quantized = type(model).from_pretrained(folder, quantization_config=spec.bnb_config(),
                                                    dtype=model.dtype, **kwargs)
    except (ImportError, RuntimeError, ValueError) as err:
        raise TunelabError(f"adapter=qlora: bitsandbytes cannot load a 4-bit model here ({first_line(err)}); "
                           "use adapter=lora") from None
    if not count_4bit_layers(quantized):
        raise TunelabError(f"adapter=qlora: {type(model).__name__} has no Linear layer to quantise; use adapter=lora")
    quantized.name_or_path = model.name_or_path  # not the temporary folder (PEFT records it as the base)
    quantized.config._name_or_path = model.config._name_or_path
    for layer in quantized.modules():
        if is_4bit_layer(layer):
            # bitsandbytes' bf16 inference kernel on AVX512-BF16 CPUs: off, so eval computes what training did
            layer.support_avx512bf16_for_cpu = False
    # Layer norms in fp32 and everything frozen, as QLoRA does; gradient checkpointing is the runtime group's.
    return prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)


@contextmanager
def computing_in(model, dtype: torch.dtype):
    """The 4-bit layers compute in `dtype` inside the block. The merge gate compares in fp32, as it does for
    LoRA (whose training may run under bf16 autocast): a bf16 compute dtype (bf16-mixed on a GPU) would
    otherwise make the adapter's own logits differ from any fp32 model by bf16 rounding (~0.8 on SmolLM2)."""
    layers = [m for m in model.modules() if is_4bit_layer(m)]
    saved = [m.compute_dtype for m in layers]
    for layer in layers:
        layer.compute_dtype = dtype
    try:
        yield model
    finally:
        for layer, before in zip(layers, saved):
            layer.compute_dtype = before


@torch.no_grad()
def dequantized_base(model):
    """The frozen base of a PEFT model over a 4-bit base, every 4-bit layer turned back into an fp32 nn.Linear
    holding `dequantize_4bit(weight)`: the weights the adapter trained against, as a plain transformers model."""
    base = copy.deepcopy(model).unload()  # the LoRA layers removed, nothing merged
    base = base.dequantize(dtype=torch.float32)  # transformers' dequantize_and_replace; drops quantization_config
    base.is_loaded_in_4bit = False
    if count_4bit_layers(base):
        raise TunelabError("adapter=qlora: some 4-bit layers were not dequantised; not exporting")
    return base.float()


@torch.no_grad()
def dequantized_adapter(model):
    """The same adapter (same LoRA weights, same modules_to_save) on the dequantised fp32 base: a plain LoRA
    model that computes what the 4-bit adapter model computes, whose merge is an fp32 W + BA."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = model.active_adapter
    config = copy.deepcopy(model.peft_config[name])
    base = dequantized_base(model)
    config.base_model_name_or_path = base.__dict__.get("name_or_path") or None  # PEFT warns at any other value
    plain = get_peft_model(base, config, adapter_name=name)
    result = set_peft_model_state_dict(plain, get_peft_model_state_dict(model, adapter_name=name), adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if name in k or "lora_" in k]
    if unexpected:
        raise TunelabError(f"adapter=qlora: the adapter weights do not fit the dequantised base ({unexpected[:3]})")
    plain.train(model.training)
    return plain
