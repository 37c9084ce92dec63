"""The train function: wire instantiated parts together, fit, evaluate, export. No math here."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from tunelab.data.batching import TrackDataProgress
from tunelab.eval.evaluator import baseline_results, eval_callbacks, evaluate
from tunelab.eval.report import comparison, print_comparison, write_reports
from tunelab.models.adapters import adapter_changes_base, is_peft
from tunelab.models.export import save_base, save_final, save_merged
from tunelab.models.loading import resolve_model_path
from tunelab.models.qlora import is_4bit
from tunelab.platform.hardware import training_device
from tunelab.platform.sharding import check_shardable, full_model
from tunelab.progress import PlainProgress, interactive
from tunelab.run import lock, rundir
from tunelab.run.assemble import assemble, build_evaluator, build_trainer, finalize
from tunelab.run.interrupts import CheckpointOnInterrupt, install_outside_fit_handlers
from tunelab.run.loggers import checkpoint_step, finish_loggers, keep_history, remember_wandb_id
from tunelab.run.provenance import write_manifest
from tunelab.run.summary import TrainingSummary, reset_peak_memory

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig, resuming: bool) -> list:
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        extra = {}
        if name == "wandb":
            extra = {"resuming": resuming, "run_config": OmegaConf.to_container(cfg, resolve=True)}
        loggers.append(instantiate(logger_cfg, _convert_="all", _recursive_=False, **extra))
    return loggers


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list:
    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not has_logger:  # Lightning refuses a learning-rate monitor with nowhere to log (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not interactive():  # a log file: plain progress lines instead of a bar
        callbacks.append(PlainProgress(every=cfg.trainer.get("log_every_n_steps") or 10))
    return callbacks + [TrackDataProgress()]


def base_model_path(cfg: DictConfig, model, run_dir: Path) -> str:
    """Where the frozen base of an adapter lives, so `final/` loads on its own."""
    name = cfg.model.get("name_or_path")
    # PiSSA / OLoRA train on a residual of the named weights, QLoRA on their 4-bit (dequantised) copy
    if name and not adapter_changes_base(model) and not is_4bit(model):
        return resolve_model_path(name)
    return save_base(model, run_dir / "base_model")


def fit(trainer: pl.Trainer, module, datamodule, ckpt_path: str | None, interrupt: CheckpointOnInterrupt,
        run_dir: Path) -> None:
    """trainer.fit, with a signal during training turned into a reported interruption."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        raise interrupt.interruption(trainer, run_dir) from None
    except SystemExit:  # Lightning's answer to a second Ctrl+C: exit(1), nothing saved
        if interrupt.received is None:
            raise
        raise interrupt.interruption(trainer, run_dir) from None
    if interrupt.received is not None:  # the signal came during the last step: training is complete
        raise interrupt.interruption(trainer, run_dir)


def train(cfg: DictConfig) -> dict:
    """Train, evaluate and export one run into cfg.paths.run_dir, holding the dir's lock (tunelab.run.lock)."""
    with lock.holding(cfg.paths.run_dir):
        return run_in_dir(cfg)


def run_in_dir(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.run_dir)
    install_outside_fit_handlers()  # a SIGTERM before or after fit still ends as a reported interruption
    reset_peak_memory()  # this run's own peak, also when a multirun runs jobs in one process
    finalize(cfg)  # concrete device/precision and the method's Trainer pins, before anything is saved
    ckpt_path = rundir.resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    rundir.guard(run_dir, cfg.overwrite, resuming=ckpt_path is not None)
    if rank_zero_only.rank == 0:
        OmegaConf.save(cfg, run_dir / "resolved_config.yaml", resolve=True)

    parts = assemble(cfg)
    model, tokenizer, datamodule, module = parts.module.model, parts.tokenizer, parts.datamodule, parts.module
    write_manifest(cfg, run_dir, tokenizer, datamodule, resuming=ckpt_path is not None)  # provenance.json
    log.info("parameters: %(trainable_params)d trainable of %(total_params)d", parts.params)
    evaluator = build_evaluator(cfg)
    check_shardable(cfg.trainer, module, eval_callbacks(evaluator))

    baselines = {}  # base (and few-shot base): evaluated before training, saved for a resume
    if evaluator.compare_base and rank_zero_only.rank == 0:
        model.to(training_device(cfg.trainer))  # base and tuned are evaluated on the same device (a GPU if it trains there)
        baselines = baseline_results(evaluator, model, datamodule, run_dir, resuming=ckpt_path is not None)
    base = baselines["base"].metrics if "base" in baselines else {}

    loggers = build_loggers(cfg, resuming=ckpt_path is not None)
    keep_history(loggers, checkpoint_step(ckpt_path))
    interrupt, summary = CheckpointOnInterrupt(run_dir / rundir.CHECKPOINTS), TrainingSummary()
    # The summary counts a batch's tokens before anything checkpoints at that batch's end (ModelCheckpoint runs last).
    callbacks = [summary, *build_callbacks(cfg, bool(loggers)), interrupt, *eval_callbacks(evaluator)]
    progress_bar = bool(cfg.trainer.get("enable_progress_bar")) and interactive()
    trainer: pl.Trainer = build_trainer(cfg, logger=loggers, callbacks=callbacks, default_root_dir=str(run_dir),
                                        enable_progress_bar=progress_bar)
    failed = True
    try:
        if trainer.is_global_zero:
            remember_wandb_id(loggers, run_dir)
        fit(trainer, module, datamodule, ckpt_path, interrupt, run_dir)
        trained = full_model(trainer, module.model)  # trainer=fsdp: the weights gathered from every rank
        if not trainer.is_global_zero:
            failed = False
            return {}
        train_summary = {**summary.summary(trainer), **parts.params}
        results = {**baselines, "tuned": evaluate(evaluator, "tuned", trained, datamodule, run_dir)}
        tuned = results["tuned"].metrics
        result = finish_run(cfg, run_dir, trained, tokenizer, datamodule, base, tuned, train_summary)
        title = f"{cfg.run_name}: base vs tuned on {evaluator.split}"
        result["metrics"] |= write_reports(run_dir, results, evaluator, title, loggers, {"run": str(run_dir)})
        for logger in loggers:
            logger.log_metrics({k: v for k, v in result["flat"].items()}, step=trainer.global_step)
        print_comparison(base, tuned, title=title, few_shot=results["few_shot"].metrics if "few_shot" in results else None)
        rundir.write_json_atomic(run_dir / rundir.METRICS, result["metrics"])  # last: marks the run finished
        failed = False
        return result["flat"]
    finally:
        finish_loggers(loggers, failed)


def finish_run(cfg, run_dir: Path, model, tokenizer, datamodule, base: dict, tuned: dict, summary: dict) -> dict:
    """Export `final/` (and `merged/`), and assemble metrics.json."""
    base_path = base_model_path(cfg, model, run_dir) if is_peft(model) else None
    save_final(model, tokenizer, run_dir / "final", base_path)
    if cfg.merge and is_peft(model):
        probe = datamodule.collator([datamodule.datasets["train"][i] for i in range(min(2, len(datamodule.datasets["train"])))])
        probe = {k: probe[k].to(model.device) for k in ("input_ids", "attention_mask")}
        summary["merge_max_logit_gap"] = save_merged(model, tokenizer, run_dir / "merged", probe, cfg.merge_tolerance)
    metrics = {"base": base, "tuned": tuned, "delta": comparison(base, tuned), "train": summary,
               "run_name": cfg.run_name, "study": cfg.study, "seed": cfg.seed}
    flat = {f"tuned/{k}": v for k, v in tuned.items()}
    flat |= {f"base/{k}": v for k, v in base.items()}
    # logged scalars keep their names (train/loss, val/loss); the run's own figures get train/
    flat |= {k if "/" in k else f"train/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
    return {"metrics": metrics, "flat": flat}
