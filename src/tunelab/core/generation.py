"""The one generation engine: every sampler (on-policy rollouts, evaluators, the judge, chat, the
benchmarks) goes through it, so a faster backend helps all of them at once (nanochat's Engine).

Two levels, one backend underneath:
- `sample(model, query_ids, query_mask, ...) -> Samples`: tensors in, tensors out (rollouts);
- `generate_completions(model, tokenizer, prompts, ...) -> [Completion]`: texts in, texts out.

The backend is the `generation` config group (`generation.engine=hf|vllm`, see conf/generation/):
`hf` is transformers' `generate` on the model object itself (the default: no server, nothing to sync);
`vllm` samples in vLLM (tunelab.core.vllm_backend), as TRL's `use_vllm`, in its `server` or `colocate`
mode. `configure(cfg.generation)` makes an engine the active one; `engine=` overrides it per call.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from tunelab.core.inference import autocast
from tunelab.errors import TunelabError
from tunelab.progress import progress_bar

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Completion:
    text: str
    finished: bool     # ended with an end-of-turn/EOS token before max_new_tokens ran out
    new_tokens: int


@dataclass
class Samples:
    """What one batched sampling call returns, every tensor on the query's device.

    response: [B, T] sampled ids, pad after each row's first stop token (T: the longest row);
    mask: [B, T] 1 up to and including the first stop token; has_eos: [B] whether a stop token came;
    logprobs: [B, T] the engine's log-prob of each sampled token at the sampling temperature,
    log_softmax(logits / temperature) with no top-k/top-p renormalisation (the trainer's convention), 0
    on padding; None where the backend gives none (vLLM greedy)."""

    response: torch.Tensor
    mask: torch.Tensor
    has_eos: torch.Tensor
    logprobs: torch.Tensor | None = None

    def __iter__(self):
        # `response, mask, has_eos, logprobs = sample(...)`: the on-policy module's `generate()` shape
        return iter((self.response, self.mask, self.has_eos, self.logprobs))


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS of the tokenizer plus any the model's generation config adds (chat models often have several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


def as_id_list(ids) -> list[int]:
    return sorted(ids) if isinstance(ids, (set, list, tuple)) else [int(ids)]


def stop_mask(response: torch.Tensor, stop_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over each row up to and including its first stop token, whether one came at all).

    Only the response is looked at: a stop token in the prompt (or pad == EOS) never ends a response."""
    is_stop = torch.isin(response, torch.tensor(as_id_list(stop_ids), device=response.device))
    has_eos = is_stop.any(-1)
    last = torch.full_like(has_eos, max(response.shape[1] - 1, 0), dtype=torch.long)
    first = torch.where(has_eos, is_stop.long().argmax(-1), last)
    positions = torch.arange(response.shape[1], device=response.device)
    return (positions[None, :] <= first[:, None]).long(), has_eos


def finish(response: torch.Tensor, logprobs: torch.Tensor | None, stop_ids, pad_token_id: int) -> Samples:
    """Samples from raw rows: masked after the first stop token, padding where the mask is 0."""
    mask, has_eos = stop_mask(response, stop_ids)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_token_id))
    if logprobs is not None:
        logprobs = logprobs * mask
    return Samples(response, mask, has_eos, logprobs)


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """log_softmax(logits / temperature) at the sampled tokens, as the trainer takes it (fp32)."""
    scaled = logits.float() / (temperature or 1.0)
    return torch.log_softmax(scaled, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class Engine:
    """A backend: `sample` (tensors) is what each one implements; `complete` (texts) is built on it."""

    name = "engine"

    def sample(self, model, query: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
               eos_token_id, pad_token_id: int, temperature: float | None = 1.0, top_k: int | None = 0,
               top_p: float | None = 1.0, do_sample: bool = True, return_logprobs: bool = True,
               precision: str | None = None, tokenizer=None, **options) -> Samples:
        """Sampled responses to left-padded prompt ids (see Samples). `precision` is the run's compute
        precision (hf: its autocast; vllm: the dtype it serves at); `tokenizer` lets a backend that needs
        one (vLLM renders log-probs with it) have the policy's own; the rest are generate()'s names."""
        raise NotImplementedError

    def complete(self, model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 64,
                 precision: str | None = "auto", description: str = "generating", on_batch=None,
                 **sampling) -> list[Completion]:
        """A Completion for each prompt text, in order; longest prompts first to waste the least padding."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[Completion | None] = [None] * len(prompts)
        stops = stop_token_ids(model, tokenizer)
        device = next(model.parameters()).device
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            with progress_bar(description, len(prompts)) if description else silent() as progress:
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    inputs = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                       add_special_tokens=False).to(device)
                    samples = self.sample(model, inputs["input_ids"], inputs["attention_mask"],
                                          max_new_tokens=max_new_tokens, eos_token_id=sorted(stops),
                                          pad_token_id=tokenizer.pad_token_id, return_logprobs=False,
                                          precision=precision, tokenizer=tokenizer, **completion_sampling(sampling))
                    done = [completion(tokenizer, row, n, stops) for row, n in zip(samples.response, samples.mask.sum(-1))]
                    for i, c in zip(chunk, done):
                        outputs[i] = c
                    if on_batch is not None:
                        on_batch(chunk, done)
                    progress.advance(len(chunk))
        finally:
            tokenizer.padding_side = side
        return outputs

    def close(self) -> None:
        """Release what the backend holds (a server process, GPU memory); the HF backend holds nothing."""


@contextlib.contextmanager
def silent():
    """No progress lines (chat: the reply itself is the progress)."""

    class Quiet:
        def advance(self, n: int) -> None:
            pass

    yield Quiet()


def completion_sampling(sampling: dict) -> dict:
    """generate()-style settings as `sample` takes them: greedy unless do_sample, no temperature then."""
    sampling = dict(sampling)
    do_sample = bool(sampling.pop("do_sample", False))
    for name in ("temperature", "top_k", "top_p"):
        sampling.setdefault(name, None)  # None: the backend's (the model's generation config's) default
    return {"do_sample": do_sample, **sampling}


def completion(tokenizer, row: torch.Tensor, length, stops: set[int]) -> Completion:
    """The text of one masked response row, whether it ended on a stop token, and its new-token count."""
    ids = row[: int(length)].tolist()
    finished = bool(ids) and ids[-1] in stops
    new_tokens = len(ids) - 1 if finished else len(ids)
    return Completion(tokenizer.decode(ids[:new_tokens], skip_special_tokens=True).strip(), finished, new_tokens)


# ---------------------------------------------------------------- the hf backend


class HFEngine(Engine):
    """transformers' `generate` on the model object: left-padded batches with the KV cache."""

    name = "hf"

    @torch.no_grad()
    def sample(self, model, query, query_mask, *, max_new_tokens, eos_token_id, pad_token_id, temperature=1.0,
               top_k=0, top_p=1.0, do_sample=True, return_logprobs=True, precision=None, tokenizer=None,
               **options) -> Samples:
        was_training = model.training
        model.eval()
        try:
            with autocast(precision, query.device):
                out = model.generate(
                    input_ids=query, attention_mask=query_mask, do_sample=do_sample, max_new_tokens=max_new_tokens,
                    temperature=temperature if do_sample else None, top_k=top_k if do_sample else None,
                    top_p=top_p if do_sample else None, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                    return_dict_in_generate=True, output_logits=return_logprobs, use_cache=True, **options)
        finally:
            model.train(was_training)
        response = out.sequences[:, query.shape[1] :]
        logprobs = None
        if return_logprobs:
            logprobs = sampled_logprobs(torch.stack(out.logits, 1), response, temperature)
        return finish(response, logprobs, eos_token_id, pad_token_id)


# ---------------------------------------------------------------- choosing the engine

DEFAULT = HFEngine()
_active: dict = {"engine": DEFAULT, "settings": None}


def build_engine(settings: dict | None) -> Engine:
    """The engine a `generation` config node asks for (None or engine=hf: the HF backend)."""
    settings = dict(settings or {})
    name = "vllm" if settings.get("use_vllm") else str(settings.get("engine") or "hf")
    if name not in ENGINES:
        raise TunelabError(f"generation.engine={name} is not known; use one of {' | '.join(ENGINES)}")
    if name == "hf":
        return DEFAULT
    from tunelab.core.vllm_backend import build_vllm_engine

    return build_vllm_engine(settings)


def configure(settings) -> Engine:
    """Make the engine of a `generation` config node the active one (what `sample` and
    `generate_completions` use unless given `engine=`). The same settings keep the same engine (a vLLM
    server stays up between runs of one process); other settings close the old one first."""
    if settings is not None and not isinstance(settings, dict):
        from omegaconf import OmegaConf

        settings = OmegaConf.to_container(settings, resolve=True)
    if settings == _active["settings"]:
        return _active["engine"]
    engine = build_engine(settings)
    if _active["engine"] is not engine:
        _active["engine"].close()
    _active.update(engine=engine, settings=settings)
    return engine


def active_engine() -> Engine:
    return _active["engine"]


def activate(engine: Engine) -> Engine:
    """Make an engine object the active one, keeping the settings it came from (a benchmark wraps the
    configured engine to time it, without closing it)."""
    _active["engine"] = engine
    return engine


def sample(model, query_ids: torch.Tensor, query_mask: torch.Tensor, *, engine: Engine | None = None,
           **kwargs) -> Samples:
    """Sampled responses to left-padded prompt ids, through the active engine (see Engine.sample)."""
    return (engine or active_engine()).sample(model, query_ids, query_mask, **kwargs)


def generate_completions(model, tokenizer, prompts: list[str], batch_size: int = 16, max_new_tokens: int = 64,
                         precision: str | None = "auto", description: str = "generating", on_batch=None,
                         engine: Engine | None = None, **sampling) -> list[Completion]:
    """A Completion for each prompt text, in order (greedy unless `do_sample=True`).

    `on_batch(indices, completions)` is called after every batch, so callers can save work as it comes."""
    return (engine or active_engine()).complete(model, tokenizer, prompts, batch_size, max_new_tokens, precision,
                                                description, on_batch, **sampling)


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Completion texts for each prompt, in order (see generate_completions for the arguments)."""
    return [c.text for c in generate_completions(model, tokenizer, prompts, **kwargs)]
