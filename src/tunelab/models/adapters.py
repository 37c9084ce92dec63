"""Which parameters move: full fine-tuning or a PEFT adapter given by its own config class."""

from __future__ import annotations

import torch

from tunelab.errors import TunelabError


class FullFineTuning:
    """Every parameter trains (the `adapter=full` choice)."""

    def __repr__(self) -> str:
        return "FullFineTuning()"


def apply_adapter(model: torch.nn.Module, adapter) -> torch.nn.Module:
    """The model to train: unchanged for full fine-tuning, wrapped by PEFT for a PeftConfig (on a 4-bit
    base for QLoRA)."""
    from peft import PeftConfig, get_peft_model

    from tunelab.models.qlora import QLoRA, quantize

    if adapter is None or isinstance(adapter, FullFineTuning):
        model.requires_grad_(True)
        return model
    if isinstance(adapter, QLoRA):  # the base quantised to 4-bit, then LoRA on it as below
        return get_peft_model(quantize(model, adapter), adapter.lora)
    if isinstance(adapter, PeftConfig):
        from tunelab.models.sentence import add_lora, is_sentence_transformer

        if is_sentence_transformer(model):  # LoRA goes on its transformer module; the model stays a SentenceTransformer
            return add_lora(model, adapter)
        return get_peft_model(model, adapter)
    raise TypeError(f"adapter must be FullFineTuning, QLoRA or a peft.PeftConfig, got {type(adapter).__name__}")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# init_lora_weights values that move part of each base weight into the adapter (PEFT): the adapter-disabled
# network is then a residual, not the model training started from.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
KNOWN_INITS = (True, False, "gaussian", "eva", "orthogonal", *BASE_CHANGING_INITS)


def build_adapter(node):
    """The adapter group as objects: (FullFineTuning or a PeftConfig, LoRA+ ratio or None).

    `loraplus_lr_ratio` and `lr` sit in the adapter group (a LoRA choice; the rate this adapter trains well at,
    which optimizer.lr follows) but are optimizer settings, not LoraConfig fields, so they are taken out before
    PEFT sees the rest."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    ratio = node.pop("loraplus_lr_ratio", None)
    node.pop("lr", None)
    check_init(node.get("init_lora_weights", True))
    if ratio is not None and not ratio >= 1:
        raise TunelabError(f"adapter.loraplus_lr_ratio={ratio} must be >= 1 (B's learning rate over A's; "
                           "the LoRA+ paper uses 16), or null for plain LoRA")
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, _convert_="all"), ratio
    except InstantiationException as err:  # a refusal (adapter=qlora) stays the one line it was
        if isinstance(err.__cause__, TunelabError):
            raise err.__cause__ from None
        raise


def check_init(init) -> None:
    name = init.split("_niter_")[0] if isinstance(init, str) else init  # pissa_niter_4: fast SVD
    if name not in KNOWN_INITS:
        raise TunelabError(f"adapter.init_lora_weights={init} is unknown; use one of "
                           f"{', '.join(str(k).lower() for k in KNOWN_INITS)} (PEFT's names)")


def adapter_changes_base(model) -> bool:
    """True when a PEFT model's init moved part of the base weights into the adapter (PiSSA, OLoRA, ...)."""
    configs = getattr(model, "peft_config", {}).values()
    return any(isinstance(getattr(c, "init_lora_weights", True), str)
               and c.init_lora_weights.split("_")[0] in BASE_CHANGING_INITS for c in configs)


def qlora(bits: int = 4, quant_type: str = "nf4", compute_dtype: str = "auto", double_quant: bool = True, **lora):
    """adapter=qlora: LoRA (PEFT's LoraConfig options, as adapter=lora) over a bitsandbytes 4-bit base
    (tunelab.models.qlora). Refused in one line where bitsandbytes cannot be imported."""
    from peft import LoraConfig

    from tunelab.models.qlora import COMPUTE_DTYPES, QUANT_TYPES, QLoRA, import_bitsandbytes

    if bits != 4:
        raise TunelabError(f"adapter.bits={bits}: adapter=qlora quantises the base to 4 bits only; use adapter.bits=4")
    if quant_type not in QUANT_TYPES:
        raise TunelabError(f"adapter.quant_type={quant_type} is unknown; use one of {', '.join(QUANT_TYPES)}")
    if compute_dtype != "auto" and compute_dtype not in COMPUTE_DTYPES:
        raise TunelabError(f"adapter.compute_dtype={compute_dtype} is unknown; use auto or one of "
                           f"{', '.join(COMPUTE_DTYPES)}")
    init = lora.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0] in BASE_CHANGING_INITS:
        raise TunelabError(f"adapter=qlora with adapter.init_lora_weights={init} is not built (it would rewrite the "
                           "4-bit base); use true or gaussian, or adapter=lora")
    import_bitsandbytes()
    return QLoRA(LoraConfig(**lora), quant_type=quant_type, compute_dtype=compute_dtype, double_quant=bool(double_quant))
