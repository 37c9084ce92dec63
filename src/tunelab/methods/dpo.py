"""Direct preference optimisation (Rafailov et al. 2023) and its IPO / hinge / robust variants.

The policy is the `model` (full or LoRA); the reference is the adapter-disabled policy when the
policy is a fresh LoRA adapter (no second copy in memory), a frozen copy of the starting weights for
full fine-tuning, or a finished run given by `reference_model`. Log-probs are summed over the
completion tokens only (the `labels` of `PairTokenizer`, which also marks the end-of-turn token).
With `precompute_ref_logps` the reference scores every train/val pair once before the first step
and is then dropped, so training holds one model. `rpo_alpha` (TRL's name) adds the RPO term (Pang et al.
2024): alpha times the per-token NLL of the chosen answers, which keeps their likelihood from falling.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.core.inference import inference
from tunelab.core.logprobs import (  # noqa: F401  (re-exported: where DPO's users found them)
    chosen_nll, completion_logps, disable_dropout, frozen_reference, pair_logps, preference_accuracy, stacked_pairs)
from tunelab.errors import TunelabError
from tunelab.eval.result import EvalResult
from tunelab.methods.preference import PreferenceModule
from tunelab.models.adapters import adapter_changes_base, is_peft

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # per-row floats once precomputed


# ---------------------------------------------------------------- the objective


@dataclass
class DPOOutput:
    losses: torch.Tensor            # one per pair
    chosen_rewards: torch.Tensor    # beta * (log pi_c - log ref_c), detached
    rejected_rewards: torch.Tensor


def check_loss_options(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise TunelabError(f"method.module.loss_type={loss_type} is unknown; use one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise TunelabError(f"method.module.beta={beta} must be > 0 (0.1 is the usual start)")
    if not 0 <= label_smoothing < 0.5:
        raise TunelabError(f"method.module.label_smoothing={label_smoothing} must be in [0, 0.5): "
                           "it is the assumed probability that a pair's labels are flipped")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise TunelabError(f"method.module.label_smoothing has no effect with loss_type={loss_type}; "
                           "use sigmoid (conservative DPO) or robust, or set it to 0")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> DPOOutput:
    """Per-pair losses from summed completion log-probs of policy and reference.

    sigmoid: -(1-e) log s(b d) - e log s(-b d), d = (log pi_c - log ref_c) - (log pi_r - log ref_r)
             (e > 0 is conservative DPO, Mitchell 2023); hinge: relu(1 - b d) (SLiC);
    ipo:     (d' - 1/(2b))^2 with d' the same difference of *per-token mean* log-ratios (Azar et al. 2023,
             length-normalised as TRL does); robust: unbiased under label noise e (Chowdhury et al. 2024)."""
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise TunelabError("loss_type=ipo needs the completion token counts (chosen_tokens, rejected_tokens)")
        mean_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    else:
        check_loss_options(beta, loss_type, label_smoothing)
    return DPOOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def check_rpo_alpha(rpo_alpha: float | None) -> None:
    if rpo_alpha is not None and not rpo_alpha >= 0:
        raise TunelabError(f"method.module.rpo_alpha={rpo_alpha} must be >= 0 or null (1.0 is the RPO paper's value)")


# ---------------------------------------------------------------- the module


class DPOModule(PreferenceModule):
    """DPO on (prompt, chosen, rejected); logs loss, reward accuracy, chosen/rejected rewards, margin, logps."""

    STATS = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected",
             "nll_chosen")

    def __init__(self, model, optimizer, scheduler=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, precompute_ref_logps: bool = False, reference_model: str | None = None,
                 rpo_alpha: float | None = None):
        check_loss_options(beta, loss_type, label_smoothing)
        check_rpo_alpha(rpo_alpha)
        super().__init__(model, optimizer, scheduler)
        self.rpo_alpha = rpo_alpha
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.precompute_ref_logps = precompute_ref_logps
        self.ref_model = frozen_reference(model, reference_model)

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if all(k in batch for k in REF_KEYS):
            return batch[REF_KEYS[0]], batch[REF_KEYS[1]]
        if self.precompute_ref_logps and self.ref_model is None and not is_peft(self.model):
            raise TunelabError("a batch came without precomputed reference log-probs after the reference was "
                               "dropped; set method.module.precompute_ref_logps=false")
        if self.ref_model is None:
            with self.model.disable_adapter():
                return pair_logps(self.model, batch, self.pad_id)[:2]
        return pair_logps(self.ref_model, batch, self.pad_id)[:2]

    def on_fit_start(self) -> None:
        if not self.precompute_ref_logps:
            return
        datamodule = self.trainer.datamodule
        with self.trainer.precision_plugin.forward_context():
            for split in ("train", "val"):
                dataset = datamodule.datasets.get(split)
                if dataset is not None and len(dataset):
                    self.annotate_reference(dataset.rows, datamodule.collator, datamodule.eval_batch_size)
        if self.ref_model is not None:  # its work is done: free the second copy
            self.ref_model = None

    def annotate_reference(self, rows: list[dict], collator, batch_size: int) -> None:
        """Store the reference's log-probs in each row; the collator hands them on as tensors."""
        if all(k in rows[0] for k in REF_KEYS):
            return  # a resumed fit: already there
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(self.device) for k, v in collator(chunk).items() if torch.is_tensor(v)}
            chosen, rejected = self.reference_logps(batch)
            for row, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                row[REF_KEYS[0]], row[REF_KEYS[1]] = float(c), float(r)
        log.info("reference log-probs precomputed for %d pairs", len(rows))

    def step_stats(self, batch: dict) -> tuple[torch.Tensor, dict]:
        chosen, rejected, chosen_tokens, rejected_tokens = pair_logps(self.model, batch, self.pad_id)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing,
                       chosen_tokens, rejected_tokens)
        stats = {"accuracy": preference_accuracy(out.chosen_rewards, out.rejected_rewards),
                 "margin": (out.chosen_rewards - out.rejected_rewards).mean(),
                 "reward_chosen": out.chosen_rewards.mean(), "reward_rejected": out.rejected_rewards.mean(),
                 "logps_chosen": chosen.detach().mean(), "logps_rejected": rejected.detach().mean()}
        nll = chosen_nll(chosen, chosen_tokens)
        stats["nll_chosen"] = nll.detach()
        loss = out.losses.mean()
        return (loss + self.rpo_alpha * nll if self.rpo_alpha else loss), stats


# ---------------------------------------------------------------- evaluation


class DPOEvaluator:
    """Held-out DPO metrics of a policy: loss, reward accuracy and margin against the reference, plus
    `logp_accuracy` (the policy alone gives the chosen response the higher log-prob), which needs no reference.

    The reference is the adapter-disabled model for a LoRA policy; for full fine-tuning it is the
    base evaluation this evaluator ran first (the base *is* the reference), and without one (a resumed
    run, or compare_base=false) only the reference-free metrics are reported."""

    def __init__(self, split: str = "test", batch_size: int = 16, precision: str | None = "auto",
                 compare_base: bool = True, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, max_examples: int | None = None):
        check_loss_options(beta, loss_type, label_smoothing)
        self.split, self.batch_size, self.precision = split, batch_size, precision
        self.compare_base, self.max_examples = compare_base, max_examples
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.base_logps: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def logps(self, model, datamodule, rows: list[dict], disable_adapter: bool = False):
        device = next(model.parameters()).device
        pad = model.config.pad_token_id or 0
        out = [[], [], [], []]
        for start in range(0, len(rows), self.batch_size):
            batch = datamodule.collator(rows[start : start + self.batch_size])
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            if disable_adapter:
                with model.disable_adapter():
                    values = pair_logps(model, batch, pad)
            else:
                values = pair_logps(model, batch, pad)
            for acc, value in zip(out, values):
                acc.append(value.float().cpu())
        return [torch.cat(v) for v in out]

    def run(self, model, datamodule) -> EvalResult:
        rows, pairs = pair_rows(datamodule, self.split)
        if not rows:
            return EvalResult()
        with inference(model, self.precision):
            chosen, rejected, n_chosen, n_rejected = self.logps(model, datamodule, rows)
            reference = None
            if is_peft(model) and not adapter_changes_base(model):
                reference = self.logps(model, datamodule, rows, disable_adapter=True)[:2]
            elif self.base_logps is not None:
                reference = self.base_logps
            else:  # the first (base) evaluation of a full model: it is the reference of what follows
                self.base_logps = (chosen, rejected)
                reference = self.base_logps
        s = self.split
        metrics = {f"{s}/logp_accuracy": preference_accuracy(chosen, rejected).item(),
                   f"{s}/logps_chosen": chosen.mean().item(), f"{s}/logps_rejected": rejected.mean().item()}
        if len(pairs) != len(rows):  # some pairs did not fit data.max_length: texts no longer line up
            pairs = [None] * len(rows)
        rows = [{**({"prompt": p.prompt[-1]["content"], "chosen": p.chosen[-1]["content"],
                     "rejected": p.rejected[-1]["content"]} if p else {}), "logps_chosen": c, "logps_rejected": r}
                for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist())]
        if reference is not None:
            out = dpo_loss(chosen, rejected, *reference, self.beta, self.loss_type, self.label_smoothing, n_chosen, n_rejected)
            metrics |= {f"{s}/loss": out.losses.mean().item(),
                        f"{s}/accuracy": preference_accuracy(out.chosen_rewards, out.rejected_rewards).item(),
                        f"{s}/margin": (out.chosen_rewards - out.rejected_rewards).mean().item(),
                        f"{s}/reward_chosen": out.chosen_rewards.mean().item(),
                        f"{s}/reward_rejected": out.rejected_rewards.mean().item()}
            for row, c, r in zip(rows, out.chosen_rewards.tolist(), out.rejected_rewards.tolist()):
                row |= {"reward_chosen": c, "reward_rejected": r}
        return EvalResult(metrics, rows[: self.max_examples or None])


def pair_rows(datamodule, split: str) -> tuple[list[dict], list]:
    """(tokenised pairs, their PreferencePairs) of a split: its rows when the method trained on pairs, else its
    paired examples tokenised as DPO reads them (KTO trains on them unpaired; unpaired data has no pairs)."""
    from tunelab.data.preference import PairTokenizer, PreferencePair

    dataset = datamodule.datasets.get(split)
    if dataset is None or not len(dataset):
        return [], []
    if "chosen_input_ids" in dataset.rows[0]:
        return dataset.rows, datamodule.examples[split]
    pairs = [e for e in datamodule.examples.get(split, []) if isinstance(e, PreferencePair)]
    rows = PairTokenizer()(pairs, datamodule.formatter, datamodule.max_length)[0] if pairs else []
    return rows, pairs


LN2 = math.log(2)  # the loss of every pair while the policy equals its reference
