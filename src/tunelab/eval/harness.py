"""lm-evaluation-harness beside the task metrics: standard benchmarks on the in-memory base and tuned models.

lm-eval's own API does the work: `HFLM(pretrained=<model object>)` wraps the model as it is (a LoRA adapter
attached, nothing exported), `TaskManager(include_path=...)` adds the tasks shipped with tunelab, and
`simple_evaluate` scores them. Scores are cached per (model, task, settings) under $TUNELAB_CACHE/harness,
so a study computes its base model's scores once.

Hub tasks (MMLU, GSM8K, ...) fetch their data from the Hugging Face hub. When the hub does not answer,
the libraries are switched to offline mode first (a cached copy still loads) and a task with no copy is
refused in one line, instead of lm-eval's retries and traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.paths import PACKAGE_DIR, cache_dir

log = logging.getLogger(__name__)

LOCAL_TASKS_DIR = PACKAGE_DIR / "resources" / "harness"
PREFIX = "harness"          # metric keys: harness/<task>/<metric>[/<filter>]
NO_FILTER = "none"          # lm-eval's name for "no filter" in "acc,none"
CACHE_VERSION = 1           # bump when what a cache entry holds changes


def local_task_names() -> list[str]:
    return sorted(path.stem for path in LOCAL_TASKS_DIR.glob("*.yaml"))


@functools.cache
def task_manager(with_hub_tasks: bool):
    """lm-eval's task index: the shipped tasks alone (instant), or with lm-eval's own (~6 s to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=with_hub_tasks)


def unknown_task_error(name: str, known: list[str]) -> TunelabError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return TunelabError(f"eval.harness.tasks: lm-eval has no task '{name}'; {hint}the shipped local tasks are "
                        f"{', '.join(local_task_names())}; `lm-eval ls tasks` lists the rest")


def manager_for(tasks: list[str]):
    """The smallest task index that knows every name (a YAML file path counts as known), or a one-line error."""
    if not tasks:
        raise TunelabError("eval.harness.tasks is empty; give one or more lm-eval task names, "
                           "e.g. \"eval.harness.tasks=[tunelab_facts_mc]\"")
    for path in (t for t in tasks if Path(t).suffix == ".yaml" and not Path(t).expanduser().is_file()):
        raise TunelabError(f"eval.harness.tasks: task file {path} does not exist; give an lm-eval task name or "
                           "the path of a task YAML")
    local = set(local_task_names())
    names = [t for t in tasks if not Path(t).suffix == ".yaml"]
    if all(name in local for name in names):
        return task_manager(False)
    manager = task_manager(True)
    for name in names:
        if name not in manager.all_tasks:
            raise unknown_task_error(name, manager.all_tasks)
    return manager


def needs_hub(tasks: list[str]) -> list[str]:
    local = set(local_task_names())
    return [t for t in tasks if t not in local and Path(t).suffix != ".yaml"]


def hub_offline(tasks: list[str]) -> str | None:
    """Why the hub counts as unreachable for these tasks' data (the libraries then switched to offline mode,
    where a cached copy still loads), or None: no hub task, or the hub answers."""
    from tunelab.models import hub

    if not needs_hub(tasks):
        return None
    why = hub.unreachable_because()
    if why is not None:
        hub.go_offline()
    return why


@contextlib.contextmanager
def loading_data(tasks: list[str], why: str | None):
    """A task whose data cannot be fetched, as one line instead of lm-eval's traceback."""
    try:
        yield
    except ConnectionError as err:  # datasets' "Couldn't reach ... on the Hub" (offline mode included)
        hub_tasks = ", ".join(needs_hub(tasks))
        if why is None:
            raise TunelabError(f"eval.harness.tasks: lm-eval could not fetch the data of {hub_tasks}: "
                               f"{str(err).splitlines()[0]}") from None
        raise TunelabError(f"eval.harness.tasks: {hub_tasks} read their data from the Hugging Face hub, but the hub "
                           f"is unreachable ({why}) and no copy is cached; run once with a network, or use the "
                           f"shipped local tasks ({', '.join(local_task_names())})") from None


def check_tasks(tasks: list[str]) -> None:
    """Before a run starts (preflight): every name known, and with the hub unreachable, every hub task's data
    cached (loaded now to find out; with a network it is fetched when the run evaluates)."""
    tasks = list(tasks)
    manager = manager_for(tasks)
    why = hub_offline(tasks)
    if why is not None:
        with loading_data(tasks, why):
            manager.load(tasks)


def scores_of(entry: dict) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's 'acc,none' / 'acc_stderr,none' entries as ({'acc': x}, {'acc_stderr': s}); a filter other
    than none is kept in the name ('exact_match/strict-match')."""
    scores, errors = {}, {}
    for key, value in entry.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == NO_FILTER else f"{metric}/{filter_name}"
        (errors if metric.endswith("_stderr") else scores)[name] = float(value)
    return scores, errors


@dataclass
class TaskScores:
    """What one requested task (or group) scored: its metrics, their standard errors, examples scored."""

    scores: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    samples: int = 0


def task_scores(results: dict, requested: str) -> dict[str, TaskScores]:
    """{name: scores} for a requested name: the task or group itself, or a tag's tasks one by one."""
    entries = results.get("results", {})
    names = [requested] if requested in entries else [n for n in entries if n not in results.get("groups", {})]
    out = {}
    for name in names:
        scores, stderr = scores_of(entries[name])
        samples = results.get("n-samples", {}).get(name, {}).get("effective", 0)
        out[name] = TaskScores(scores, stderr, int(samples))
    return out


class Harness:
    """lm-eval tasks on one model: `harness(model, tokenizer, precision)` -> (metrics, summary).

    metrics: {'harness/<task>/<metric>': value}, beside the task metrics in metrics.json, report.md and
    the loggers; summary: standard errors and example counts, listed in report.md."""

    def __init__(self, tasks: list[str], num_fewshot: int | None = None, limit: int | float | None = None,
                 batch_size: int = 16, apply_chat_template: bool = False, bootstrap_iters: int = 1000,
                 max_length: int | None = None, seed: int = 1234, cache: bool = True):
        self.tasks = list(tasks or [])
        self.num_fewshot = num_fewshot
        self.limit = limit
        self.batch_size = batch_size
        self.apply_chat_template = apply_chat_template
        self.bootstrap_iters = bootstrap_iters
        self.max_length = max_length
        self.seed = seed
        self.cache = cache

    def settings(self, dtype) -> dict:
        """Everything besides the model and the task that changes a score (the cache key)."""
        import lm_eval

        from tunelab.core.generation import active_engine

        settings = {"num_fewshot": self.num_fewshot, "limit": self.limit, "chat": self.apply_chat_template,
                    "max_length": self.max_length, "seed": self.seed, "bootstrap_iters": self.bootstrap_iters,
                    "autocast": str(dtype), "lm_eval": lm_eval.__version__, "version": CACHE_VERSION}
        if active_engine().name != "hf":  # generative tasks sample elsewhere (hf keeps the keys it always had)
            settings["engine"] = active_engine().name
        return settings

    def cache_path(self, model_key: str, task: str, dtype) -> Path:
        from tunelab.data.fingerprints import digest

        return cache_dir() / "harness" / f"{digest(model_key, task, task_source(task), self.settings(dtype))}.json"

    def __call__(self, model, tokenizer, precision=None) -> tuple[dict[str, float], dict]:
        from tunelab.data.fingerprints import model_fingerprint, tokenizer_fingerprint
        from tunelab.platform.hardware import autocast_dtype

        manager = manager_for(self.tasks)
        # The dtype computed in, not the setting's name: `auto` (tunelab-evaluate) and the 32-true it resolves
        # to (training) share cached scores.
        dtype = autocast_dtype(precision, next(model.parameters()).device)
        model_key = f"{model_fingerprint(model)}:{tokenizer_fingerprint(tokenizer)}" if self.cache else ""
        done = {task: self.cached(model_key, task, dtype) for task in self.tasks}
        missing = [task for task, scores in done.items() if scores is None]
        if missing:
            results = self.evaluate(manager, model, tokenizer, dtype, missing)
            for task in missing:
                done[task] = task_scores(results, task)
                self.store(model_key, task, dtype, done[task])
        return flatten(done)

    def cached(self, model_key: str, task: str, dtype) -> dict[str, TaskScores] | None:
        path = self.cache_path(model_key, task, dtype)
        if not (self.cache and path.is_file()):
            return None
        log.info("harness: %s from the cache (%s)", task, path.name)
        return {name: TaskScores(**value) for name, value in json.loads(path.read_text()).items()}

    def store(self, model_key: str, task: str, dtype, scores: dict[str, TaskScores]) -> None:
        if not self.cache:
            return
        path = self.cache_path(model_key, task, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: vars(s) for name, s in scores.items()}))
        tmp.replace(path)  # atomic: a parallel job of the study never reads half a file

    def evaluate(self, manager, model, tokenizer, dtype, tasks: list[str]) -> dict:
        """lm-eval's simple_evaluate on the model object as it is; its train/eval mode is restored after."""
        from lm_eval import simple_evaluate

        started, was_training = time.perf_counter(), model.training
        why = hub_offline(tasks)
        try:
            with loading_data(tasks, why):
                results = simple_evaluate(
                    model=self.lm(model, tokenizer, dtype), tasks=list(tasks), task_manager=manager,
                    num_fewshot=self.num_fewshot, limit=self.limit, bootstrap_iters=self.bootstrap_iters,
                    log_samples=False, apply_chat_template=self.apply_chat_template, random_seed=self.seed,
                    numpy_random_seed=self.seed, torch_random_seed=self.seed, fewshot_random_seed=self.seed)
        finally:
            model.train(was_training)
        log.info("harness: %s in %.1f s", ", ".join(tasks), time.perf_counter() - started)
        return results

    def lm(self, model, tokenizer, dtype):
        """HFLM around the in-memory model, autocast to the run's precision as generation is (None: as it is);
        with another generation engine than hf, its generative tasks sample through that engine."""
        from lm_eval.models.huggingface import HFLM

        from tunelab.core.generation import active_engine

        kind = HFLM if active_engine().name == "hf" else engine_lm()
        return kind(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=self.batch_size,
                    max_length=self.max_length, mixed_precision_dtype=dtype)


def engine_lm():
    """HFLM whose `generate_until` samples through tunelab's generation engine (e.g. vLLM) instead of HF
    `generate`: up to the task's token budget, then lm-eval cuts the text at its stop strings as it always
    does. Log-likelihood tasks score on the model object as before."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from tunelab.core.generation import sample, stop_token_ids

    class EngineLM(HFLM):
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            mask = (torch.cumsum((context != self.tokenizer.pad_token_id).long(), 1) > 0).long()  # left padding
            temperature = float(generation_kwargs.get("temperature") or 0.0)
            do_sample = bool(generation_kwargs.get("do_sample", temperature > 0))
            samples = sample(self.model, context, mask, max_new_tokens=max_length - context.shape[1],
                             do_sample=do_sample, temperature=temperature or None, top_p=generation_kwargs.get("top_p"),
                             top_k=generation_kwargs.get("top_k"), eos_token_id=sorted(stop_token_ids(self.model, self.tokenizer)),
                             pad_token_id=self.tokenizer.pad_token_id, return_logprobs=False, tokenizer=self.tokenizer)
            return torch.cat([context, samples.response], 1)

    return EngineLM


def task_source(task: str) -> str:
    """A shipped task's YAML and data by content, so editing them invalidates its cached scores."""
    from tunelab.data.fingerprints import digest, file_digest

    if task not in local_task_names():
        return task
    return digest(task, {p.name: file_digest(p) for p in sorted(LOCAL_TASKS_DIR.iterdir()) if p.is_file()})


def flatten(done: dict[str, dict[str, TaskScores]]) -> tuple[dict[str, float], dict]:
    metrics, summary = {}, {}
    for per_task in done.values():
        for name, scores in per_task.items():
            metrics |= {f"{PREFIX}/{name}/{metric}": value for metric, value in scores.scores.items()}
            summary |= {f"{name}/{metric}": value for metric, value in scores.stderr.items()}
            summary[f"{name}/examples"] = scores.samples
    return metrics, summary
