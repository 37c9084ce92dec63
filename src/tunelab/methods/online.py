"""The on-policy base PPO, GRPO and RLOO share: sample responses to a batch of prompts in one batched
`generate` call, take their log-probs at the sampling temperature, the reference policy's log-probs,
score them with reward callables (checked by `check_scores`), time each phase, and write samples.

A subclass adds what makes it a method: its advantages, its loss and its update loop (manual
optimisation: one training batch of prompts is one rollout, then several optimizer steps).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from tunelab.core.logprobs import frozen_reference
from tunelab.errors import TunelabError
from tunelab.methods.base import LanguageModelModule
from tunelab.methods.reward_model import position_ids, unwrap

PHASES = ("generate", "score", "reference", "train")


# ---------------------------------------------------------------- tensors


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over each response up to and including its first EOS, whether an EOS came at all).

    Only the response is looked at: an EOS in the prompt (or pad == EOS) never ends a response."""
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.long().argmax(-1), torch.full_like(has_eos, responses.shape[1] - 1, dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions[None, :] <= first[:, None]).long(), has_eos


def to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int):
    """Prompts right-aligned, so that generation continues every prompt from the same position."""
    lengths = attention_mask.sum(-1)
    width = input_ids.shape[1]
    ids = torch.full_like(input_ids, pad_token_id)
    mask = torch.zeros_like(attention_mask)
    for i, n in enumerate(lengths.tolist()):
        real = input_ids[i][attention_mask[i].bool()]
        ids[i, width - n :], mask[i, width - n :] = real, 1
    return ids, mask


def active(monitors: dict | None) -> dict:
    """The monitors left on: a `null` entry (`method.module.monitors.exact=null`) removes one."""
    return {name: fn for name, fn in (monitors or {}).items() if fn is not None}


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: log-probs at rollout and at update must come from the same function."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(unwrap(model), "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and getattr(config, name, None):
            setattr(config, name, 0.0)


# ---------------------------------------------------------------- the base module


class OnPolicyModule(LanguageModelModule):
    """Policy (the `model`), an optional frozen reference, sampling settings, phase timing and samples."""

    prefix = "online"  # the metric namespace (ppo/..., grpo/...)

    def __init__(self, model, optimizer, scheduler=None, *, max_new_tokens: int, temperature: float, top_k: int = 0,
                 top_p: float = 1.0, log_samples: int = 4, max_grad_norm: float | None = 1.0,
                 use_reference: bool = True):
        super().__init__(model, optimizer, scheduler)
        self.automatic_optimization = False
        if temperature <= 0:
            raise TunelabError(f"method.module.temperature={temperature} must be > 0 ({self.prefix.upper()} samples; "
                               "the same temperature scales every log-prob)")
        self.generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.log_samples, self.max_grad_norm = log_samples, max_grad_norm
        disable_dropout(model)
        self.use_reference = use_reference
        self.ref_model = self.build_reference(model) if use_reference else None
        self.samples: list[dict] = []
        self.timings: dict[str, float] = {}
        self.rng_state: dict | None = None  # the sampling stream's state (see sampling_rng)
        self.token_counts = {"tokens_processed": 0, "generated_tokens": 0}  # since the last take_token_counts()

    @staticmethod
    def build_reference(model):
        """None: the adapter-disabled policy is the reference (a fresh LoRA); else a frozen start point (a copy
        of a fully trained model, or the merged start where PiSSA/OLoRA left a residual under the adapter)."""
        return frozen_reference(model)

    @property
    def tokenizer(self):
        return self.trainer.datamodule.tokenizer

    # -- timing

    @contextlib.contextmanager
    def phase(self, name: str):
        """Adds the block's wall time to this update's `name` phase (generate, score, reference, train)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def timing_metrics(self) -> dict[str, torch.Tensor]:
        """Seconds per phase of this update, and generation's share of them; the clock restarts."""
        total = sum(self.timings.values()) or 1.0
        logged = {f"time/{name}": torch.tensor(self.timings.get(name, 0.0)) for name in PHASES}
        logged["time/generate_share"] = torch.tensor(self.timings.get("generate", 0.0) / total)
        self.timings = {}
        return logged

    # -- rollout

    @torch.no_grad()
    def generate(self, query, query_mask, do_sample: bool = True):
        """(responses, mask, has_eos, engine log-probs) for every row in one batched call of the generation
        engine (core.generation: hf | vllm); the log-probs are the engine's at the sampling temperature, None
        where it gives none. The trainer re-scores every sampled token with the policy all the same."""
        from tunelab.core.generation import sample

        tok, g = self.tokenizer, self.generation
        precision = str(self.trainer.precision) if self._trainer is not None else None  # vLLM serves at it
        with self.phase("generate"), self.sampling_rng():
            samples = sample(self.model, query, query_mask, max_new_tokens=g["max_new_tokens"], do_sample=do_sample,
                             temperature=g["temperature"], top_k=g["top_k"], top_p=g["top_p"], precision=precision,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tokenizer=tok)
        self.token_counts["generated_tokens"] += int(samples.mask.sum())
        return tuple(samples)

    def take_token_counts(self) -> dict[str, int]:
        """Tokens trained on (every pass of every update) and sampled since the last call (TrainingSummary's)."""
        counts, self.token_counts = self.token_counts, dict.fromkeys(self.token_counts, 0)
        return counts

    def decode(self, response, mask) -> list[str]:
        return [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, mask)]

    def prompts_and_references(self, batch: dict):
        """Left-padded prompt ids, their texts and the references (None where the data has none)."""
        tok = self.tokenizer
        query, query_mask = to_left_padding(batch["input_ids"], batch["attention_mask"], tok.pad_token_id)
        prompts = batch.get("prompt") or [tok.decode(ids[m.bool()]) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        references = batch.get("reference") or [None] * len(query)
        return query, query_mask, prompts, references

    def forward_logits(self, model, query, query_mask, response, mask, hidden: bool = False):
        """(log-probs of the response tokens at the sampling temperature, entropies, model output, start)."""
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        ids = torch.cat([query, response], 1)
        attention = torch.cat([query_mask, mask], 1)
        if torch.is_grad_enabled():  # a training pass (rollout and reference passes run under no_grad)
            self.token_counts["tokens_processed"] += int(attention.sum())
        out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention), use_cache=False,
                    output_hidden_states=hidden)
        start = query.shape[1] - 1
        logits = out.logits[:, start:-1].float() / self.generation["temperature"]
        return selective_log_softmax(logits, response), entropy_from_logits(logits), out, start

    def policy_logprobs(self, model, query, query_mask, response, mask):
        logprobs, entropy, _, _ = self.forward_logits(model, query, query_mask, response, mask)
        return logprobs, entropy

    @torch.no_grad()
    def reference_logprobs(self, query, query_mask, response, mask):
        with self.phase("reference"):
            if self.ref_model is None:
                with self.model.disable_adapter():
                    return self.policy_logprobs(self.model, query, query_mask, response, mask)[0]
            return self.policy_logprobs(self.ref_model, query, query_mask, response, mask)[0]

    # -- samples and logging

    def record_samples(self, rows: list[dict]) -> None:
        """A few responses per update, to samples.jsonl in the run dir and as a W&B table when W&B logs."""
        if not self.log_samples or not self.trainer.is_global_zero or not rows:
            return
        rows = [{"step": self.global_step, **row} for row in rows[: self.log_samples]]
        self.samples += rows
        with (Path(self.trainer.default_root_dir) / "samples.jsonl").open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        for logger in self.loggers:
            if hasattr(logger, "log_table"):
                keys = list(rows[0])
                logger.log_table(key=f"{self.prefix}/samples", columns=keys,
                                 data=[[row.get(k) for k in keys] for row in self.samples])

    # -- optimisation

    def optimizer_step_on(self, loss: torch.Tensor) -> None:
        """One manual optimizer step: backward (averaged over DDP ranks), clipping, step, schedule."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        self.synced_backward(loss)
        if self.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    def synced_backward(self, loss: torch.Tensor) -> None:
        """Backward, then gradients averaged over DDP ranks.

        DDP syncs only the first backward after a forward through its wrapper, and an on-policy step makes
        several backwards per training_step, so the reducer is bypassed and every minibatch averaged here."""
        from torch.nn.parallel import DistributedDataParallel

        wrapped = getattr(self.trainer.strategy, "model", None)
        if not isinstance(wrapped, DistributedDataParallel):
            self.manual_backward(loss)
            return
        with wrapped.no_sync():
            self.manual_backward(loss)
        world = torch.distributed.get_world_size()
        for param in self.parameters():
            if param.requires_grad:
                if param.grad is None:  # a parameter unused on this rank still joins the average
                    param.grad = torch.zeros_like(param)
                torch.distributed.all_reduce(param.grad)
                param.grad.div_(world)

    def updates_per_rollout(self) -> int:
        raise NotImplementedError

    def configure_optimizers(self):
        from transformers import get_scheduler

        optimizer = self.build_optimizer()
        # max_steps counts optimizer steps; otherwise each rollout batch makes updates_per_rollout() of them.
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 \
            else self.total_optimizer_steps() * self.updates_per_rollout()
        warmup = self.scheduler_cfg.get("warmup_steps") or int((self.scheduler_cfg.get("warmup_ratio") or 0.0) * total)
        scheduler = get_scheduler(self.scheduler_cfg.get("name", "constant"), optimizer, num_warmup_steps=warmup,
                                  num_training_steps=max(total, 1),
                                  scheduler_specific_kwargs=dict(self.scheduler_cfg.get("kwargs") or {}))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- the sampling RNG: its own stream per rank, saved in checkpoints, so a resumed run samples what an
    # uninterrupted one would (the global RNG is also drawn by data loaders each time one starts an epoch)

    @contextlib.contextmanager
    def sampling_rng(self):
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            if self.rng_state is None:
                torch.manual_seed(torch.initial_seed() + 1000003 * self.global_rank)
            else:
                torch.set_rng_state(self.rng_state["cpu"])
                if cuda and self.rng_state.get("cuda") is not None:
                    torch.cuda.set_rng_state(self.rng_state["cuda"], self.device)
            yield
            self.rng_state = {"cpu": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.rng_state is None:
            return
        for kind, state in self.rng_state.items():
            if state is None:
                continue
            if self.trainer.world_size > 1:  # every rank keeps its own stream (the hook runs on all ranks)
                state = self.all_gather(state.to(self.device)).cpu()
            checkpoint[f"sampling_rng_{kind}"] = state.reshape(self.trainer.world_size, -1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        states = {kind: checkpoint.get(f"sampling_rng_{kind}") for kind in ("cpu", "cuda")}
        if states["cpu"] is not None and rank < len(states["cpu"]):
            self.rng_state = {kind: None if s is None else s[rank].clone() for kind, s in states.items()}

    def rewards_to_device(self) -> list:
        """The reward callables that hold a network (moved to the policy's device at fit start)."""
        return []

    def on_fit_start(self) -> None:
        for reward in self.rewards_to_device():
            if hasattr(reward, "to"):
                reward.to(self.device)
        Path(self.trainer.default_root_dir, "samples.jsonl").unlink(missing_ok=True)
