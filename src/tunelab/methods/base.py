"""The shared base of every method: optimizer, schedule, token-weighted loss and checkpoint slimming."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from tunelab.data.tokenize import IGNORE
from tunelab.errors import TunelabError


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over supervised positions, number of those positions)."""
    targets = labels[:, 1:]
    logits = logits[:, :-1]
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


# Config fields that rescale or cap logits after the head: such models keep the plain path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling", "lm_head_multiplier")


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder stack, LM head) of a plain or LoRA-wrapped causal LM whose logits are head(hidden), else None."""
    base = model
    if hasattr(model, "get_base_model"):  # a PeftModel
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            return None  # virtual tokens live in PeftModel.forward, which the split path would skip
        base = model.get_base_model()
    config = getattr(base, "config", None)
    text = config.get_text_config() if config is not None else None
    if text is None or any(getattr(text, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(backbone, torch.nn.Module) or backbone is base or head is None:
        return None
    return backbone, head


def supervised_loss_sum(backbone: torch.nn.Module, head: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """token_loss_sum without the full logits: the head runs only where the next token is supervised.

    In SFT the prompt is most of the tokens, so this skips most of the (batch, length, vocab) logits,
    their softmax and their memory; the loss and gradients are the same.
    """
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE
    logits = head(hidden[:, :-1][supervised])
    return F.cross_entropy(logits.float(), targets[supervised], reduction="sum"), supervised.sum()


def frozen_linear_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Linear layers whose weights never train and are used by nothing else (a tied embedding is kept)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)
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
            raise TunelabError(f"method.module.frozen_weights_dtype={setting} needs trainer.precision=bf16-mixed "
                               f"(got {precision}); use auto or null")
        return torch.bfloat16
    raise TunelabError(f"method.module.frozen_weights_dtype must be auto, bfloat16 or null, got {setting!r}")


MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")


class LanguageModelModule(pl.LightningModule):
    """Holds a HF causal LM (plain or PEFT-wrapped) and the optimisation every method shares."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler: dict | None = None):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_cfg = dict(scheduler or {})
        self.val_loss_sum = SumMetric()
        self.val_tokens = SumMetric()
        # Checkpoints keep trainable weights only (see on_save_checkpoint), so loading is not strict.
        self.strict_loading = False

    def optimizer_parameters(self) -> list[dict]:
        """Decay matrices only: biases and norm weights are left alone, as is standard for transformers."""
        weight_decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, for the LR schedule.

        Not `trainer.estimated_stepping_batches`: called here, it builds Lightning's train iterator
        before a checkpoint is restored, so a resumed run would never get its data position back."""
        trainer = self.trainer
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule else None
        if loader is None:
            return int(trainer.estimated_stepping_batches)
        batches = len(loader)
        limit = trainer.limit_train_batches
        batches = int(limit) if isinstance(limit, int) else max(1, int(batches * limit))
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        by_epochs = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        by_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return min(x for x in (by_epochs, by_steps) if x is not None) if (by_epochs or by_steps) else per_epoch

    def configure_optimizers(self):
        from transformers import get_scheduler

        optimizer = self.optimizer_factory(self.optimizer_parameters())
        total = self.total_optimizer_steps()
        ratio = self.scheduler_cfg.get("warmup_ratio") or 0.0
        warmup = self.scheduler_cfg.get("warmup_steps") or math.ceil(ratio * total)
        scheduler = get_scheduler(
            self.scheduler_cfg.get("name", "cosine"),
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total,
            scheduler_specific_kwargs=dict(self.scheduler_cfg.get("kwargs") or {}),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        # Lightning's hook for sharding strategies: trainer=fsdp (tunelab.sharding) shards the network here.
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None:
            shard(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights are reloaded from the model itself; storing them would make every LoRA
        # checkpoint as large as the base model.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


class CausalLMModule(LanguageModelModule):
    """Next-token cross-entropy on the supervised tokens: sft (responses) and pretrain (all tokens).

    Speed knobs (method.module.*): head_on_supervised_only runs the LM head only where the loss
    looks (same loss, less compute and memory; models it cannot split fall back to the plain path);
    gradient_checkpointing trades ~1/3 more compute for much less activation memory;
    frozen_weights_dtype (auto: bf16 under bf16-mixed) stores frozen Linear weights as the bf16
    copies autocast would make each step (same math, half their memory, no per-step casts).
    cast_inputs_once casts each attention/MLP block's input once under autocast instead of once per
    projection (same forward values, less activation memory and copying).
    """

    def __init__(self, model: torch.nn.Module, optimizer, scheduler: dict | None = None,
                 head_on_supervised_only: bool = True, gradient_checkpointing: bool = False,
                 frozen_weights_dtype: str | None = "auto", cast_inputs_once: bool = True):
        super().__init__(model, optimizer, scheduler)
        self.frozen_weights_dtype = frozen_weights_dtype
        self.cast_inputs_once = cast_inputs_once
        self.low_precision: LowPrecisionFrozenWeights | None = None
        self.cast_once: CastInputsOnce | None = None
        self.split = backbone_and_head(model) if head_on_supervised_only else None
        # from_pretrained returns the model in eval mode and Lightning keeps submodule modes as it
        # finds them; training mode is what switches gradient checkpointing (and dropout) on.
        model.train()
        if gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads, so it also works with a frozen embedding (LoRA).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def setup(self, stage: str) -> None:
        dtype = frozen_weights_dtype_for(self.frozen_weights_dtype, self.trainer.precision)
        if stage == "fit" and dtype is not None and self.low_precision is None:
            self.low_precision = LowPrecisionFrozenWeights(self.model, dtype)
        mixed = str(self.trainer.precision) in MIXED_PRECISIONS  # the cast hooks only act under autocast
        if stage == "fit" and self.cast_inputs_once and mixed and self.cast_once is None:
            self.cast_once = CastInputsOnce(self.model)

    def on_fit_end(self) -> None:
        # Evaluation and export after training get the model back as it came.
        if self.low_precision is not None:
            self.low_precision.restore()
            self.low_precision = None
        if self.cast_once is not None:
            self.cast_once.restore()
            self.cast_once = None

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split is not None:
            return supervised_loss_sum(*self.split, batch)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return token_loss_sum(logits, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, tokens = self.loss_sum(batch)
        # Token-weighted over the whole optimizer step: Lightning divides by the accumulation count
        # and DDP averages over ranks, so scale both back before dividing by the step's token count.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        loss = loss_sum * scale / batch["step_tokens"].clamp(min=1)
        self.log("train/loss", loss_sum / tokens.clamp(min=1), prog_bar=True, batch_size=int(tokens))
        self.log("train/tokens", tokens.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss_sum, tokens = self.loss_sum(batch)
        self.val_loss_sum.update(loss_sum)
        self.val_tokens.update(tokens)

    def on_validation_epoch_end(self) -> None:
        # SumMetric reduces over ranks, so the token-weighted mean is the same on 1 or N processes.
        loss = self.val_loss_sum.compute() / self.val_tokens.compute().clamp(min=1)
        self.log_dict({"val/loss": loss, "val/perplexity": torch.exp(loss)}, prog_bar=True, sync_dist=False)
        self.val_loss_sum.reset()
        self.val_tokens.reset()
