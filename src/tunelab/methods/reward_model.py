"""Reward models: a scalar head on a causal LM base, trained with a Bradley-Terry loss on preference pairs.

The score is read at the true last token of each sequence (from the attention mask, never from
token ids), because the embedded model pads with its EOS and transformers' own pooling would skip
the EOS that ends a response.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from tunelab.errors import TunelabError
from tunelab.core.inference import autocast
from tunelab.core.tensors import position_ids, unwrap  # noqa: F401  (imported from here by other methods)
from tunelab.methods.base import LanguageModelModule

HEAD = "score"  # transformers' name for the sequence-classification head of decoder models


# ---------------------------------------------------------------- the network


class RewardModelBuilder:
    """The `method.prepare` hook: causal LM -> sequence classifier with one label, sharing the base.

    A LoRA adapter becomes a SEQ_CLS adapter that also trains (and saves) the new head."""

    def __init__(self, head_init_std: float | None = None):
        self.head_init_std = head_init_std  # None: 1/sqrt(hidden+1), as TRL's reward trainer

    def __call__(self, model, tokenizer, adapter):
        return as_reward_model(model, tokenizer, self.head_init_std), reward_adapter(adapter)


def as_reward_model(causal_lm, tokenizer, head_init_std: float | None = None):
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    with torch.device("meta"):  # the base is reused, so allocate nothing for it
        model = AutoModelForSequenceClassification.from_config(config)
    setattr(model, model.base_model_prefix, getattr(causal_lm, causal_lm.base_model_prefix))
    hidden = config.hidden_size
    head = torch.nn.Linear(hidden, 1, bias=False, dtype=next(causal_lm.parameters()).dtype)
    torch.nn.init.normal_(head.weight, std=head_init_std if head_init_std is not None else 1 / math.sqrt(hidden + 1))
    setattr(model, HEAD, head)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise TunelabError(f"cannot build a reward model from {type(causal_lm).__name__}: parameters {meta[:3]} "
                           "are not shared with the causal LM")
    return model


def reward_adapter(adapter):
    from peft import PeftConfig

    from tunelab.models.qlora import QLoRA

    if isinstance(adapter, QLoRA):  # the same for the LoRA on a 4-bit base
        return dataclasses.replace(adapter, lora=reward_adapter(adapter.lora))
    if isinstance(adapter, PeftConfig):
        adapter = copy.deepcopy(adapter)
        adapter.task_type = "SEQ_CLS"
        adapter.modules_to_save = sorted(set(adapter.modules_to_save or []) | {HEAD})
    return adapter


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for right or left padding alike."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).long().argmax(-1)


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence: the head applied to the hidden state of its last real token."""
    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]
    return getattr(inner, HEAD)(last).squeeze(-1).float()


# ---------------------------------------------------------------- the objective


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0,
                       centering: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), plus `centering * mean((r_c + r_r)^2)` to keep rewards near 0
    (Eisenstein et al. 2023, TRL's center_rewards_coefficient)."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if centering:
        loss = loss + centering * ((chosen + rejected) ** 2).mean()
    return loss


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores from one forward over both (padded to the same width)."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def widen(x, value):
        return F.pad(x, (0, width - x.shape[1]), value=value)

    pad = unwrap(model).config.pad_token_id or 0
    ids = torch.cat([widen(batch["chosen_input_ids"], pad), widen(batch["rejected_input_ids"], pad)])
    mask = torch.cat([widen(batch["chosen_attention_mask"], 0), widen(batch["rejected_attention_mask"], 0)])
    scores = reward_scores(model, ids, mask)
    return scores.chunk(2)


class RewardModule(LanguageModelModule):
    """Bradley-Terry on (chosen, rejected); logs preference accuracy and reward margin."""

    STATS = ("loss", "correct", "margin", "chosen", "rejected", "pairs")

    def __init__(self, model, optimizer, scheduler=None, margin: float = 0.0, centering: float = 0.0):
        super().__init__(model, optimizer, scheduler)
        self.margin, self.centering = margin, centering
        self.val_stats = torch.nn.ModuleDict({k: SumMetric() for k in self.STATS})

    def step_stats(self, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected = pair_scores(self.model, batch)
        loss = bradley_terry_loss(chosen, rejected, self.margin, self.centering)
        stats = {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                 "reward_chosen": chosen.mean(), "reward_rejected": rejected.mean()}
        return loss, {"chosen": chosen.detach(), "rejected": rejected.detach(), **stats}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, stats = self.step_stats(batch)
        pairs = len(stats["chosen"])
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        for key in ("accuracy", "margin", "reward_chosen", "reward_rejected"):
            self.log(f"train/{key}", stats[key], batch_size=pairs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, stats = self.step_stats(batch)
        chosen, rejected = stats["chosen"], stats["rejected"]
        values = {"loss": loss * len(chosen), "correct": (chosen > rejected).float().sum(),
                  "margin": (chosen - rejected).sum(), "chosen": chosen.sum(), "rejected": rejected.sum(),
                  "pairs": torch.tensor(float(len(chosen)), device=chosen.device)}
        for key, value in values.items():
            self.val_stats[key].update(value)

    def on_validation_epoch_end(self) -> None:
        totals = {k: m.compute() for k, m in self.val_stats.items()}
        pairs = totals["pairs"].clamp(min=1)
        self.log_dict({"val/loss": totals["loss"] / pairs, "val/accuracy": totals["correct"] / pairs,
                       "val/margin": totals["margin"] / pairs}, prog_bar=True, sync_dist=False)
        for metric in self.val_stats.values():
            metric.reset()


# ---------------------------------------------------------------- evaluation and loading


class PreferenceEvaluator:
    """Held-out preference accuracy, mean margin and loss of a reward model (the `eval` of method=reward)."""

    def __init__(self, split: str = "test", batch_size: int = 32, precision: str | None = "auto",
                 compare_base: bool = True, max_examples: int | None = None):
        self.split, self.batch_size, self.precision = split, batch_size, precision
        self.compare_base, self.max_examples = compare_base, max_examples

    @torch.no_grad()
    def run(self, model, datamodule) -> tuple[dict[str, float], list[dict]]:
        dataset = datamodule.datasets.get(self.split)
        if dataset is None or not len(dataset):
            return {}, []
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        for batch in datamodule.loader(self.split, train=False, shard=False):
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            with autocast(self.precision, device):
                c, r = pair_scores(model, batch)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        model.train(was_training)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        pairs = datamodule.examples[self.split]
        metrics = {f"{self.split}/accuracy": (chosen > rejected).float().mean().item(),
                   f"{self.split}/margin": (chosen - rejected).mean().item(),
                   f"{self.split}/loss": bradley_terry_loss(chosen, rejected).item(),
                   f"{self.split}/reward_chosen": chosen.mean().item(),
                   f"{self.split}/reward_rejected": rejected.mean().item()}
        rows = [{"prompt": p.prompt[-1]["content"], "reference": p.reference, "rejected": p.rejected[-1]["content"],
                 "reward_chosen": c, "reward_rejected": r}
                for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist())]
        return metrics, rows[: self.max_examples or None]


def is_reward_folder(folder: Path) -> bool:
    """A `final/` written by method=reward: a one-label sequence classifier, full or as a SEQ_CLS adapter."""
    if (folder / "adapter_config.json").is_file():
        return json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        archs = config.get("architectures") or []
        return any(a.endswith("ForSequenceClassification") for a in archs) and config.get("num_labels", 1) == 1 \
            and len(config.get("id2label") or {"0": 0}) == 1
    return False


def load_reward_model(path: str | Path, dtype: str = "float32"):
    """(reward model, tokenizer) from a reward run dir or its `final/` folder; frozen, in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path).expanduser()
    folder = path / "final" if (path / "final").is_dir() else path
    if not folder.is_dir() or not is_reward_folder(folder):
        raise TunelabError(
            f"{path} is not a reward model (expected a run dir of method=reward, or its final/ folder, "
            "holding a one-label sequence classifier); train one with `tunelab-train method=reward`"
        )
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(folder), num_labels=1,
                                                                       dtype=getattr(torch, dtype))
        model = model.merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False).eval()
    return model, tokenizer
