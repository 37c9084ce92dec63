"""`tunelab-evaluate`: the eval group on a run dir, a final/ folder, or any model, with no training."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.cli.common import die, named_run_dir, preflight, quiet_libraries
from tunelab.errors import TunelabError
from tunelab.paths import CONF_DIR

log = logging.getLogger("tunelab")
# Console column of each result; the results' order is report.md's: base (few-shot) tuned, or zero- then few-shot.
COLUMNS = {"base": "base", "tuned": "tuned", "model": "zero-shot", "few_shot": "few-shot"}


def compared_pair(results: dict, label: str) -> tuple[str, str] | None:
    """The two results the table compares: base vs tuned for a run, zero- vs few-shot for any model."""
    if "base" in results:
        return "base", label
    if "few_shot" in results:
        return label, "few_shot"
    return None


def user_overrides(group: str) -> list:
    """The command-line overrides of one config group and its keys (eval=judge, eval.max_examples=2, ~eval.x)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return []
    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [o for o in parsed if o.key_or_group == group or o.key_or_group.startswith(f"{group}.")]


def apply_override(settings: DictConfig, key: str, override) -> None:
    """One `KEY=VALUE`, `+KEY=VALUE` or `~KEY` on a config, as Hydra applies it (already validated by Hydra
    against the composed config, so a key the run's config lacks is added)."""
    if not override.is_delete():
        OmegaConf.update(settings, key, override.value(), merge=True, force_add=True)
        return
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(settings, parent_key) if parent_key else settings
    if isinstance(parent, DictConfig) and leaf in parent:
        del parent[leaf]


def eval_config(cfg: DictConfig, run_cfg: DictConfig | None) -> DictConfig:
    """What evaluates: a run's own eval settings, so that evaluating it again gives the report its training
    gave, with the user's command-line eval overrides on top; the eval group as composed for a model
    without a run, or with eval_from_run=false. An eval group chosen on the command line (eval=judge) adds
    what it brings; the run's values stay where both set one."""
    if run_cfg is None or "eval" not in run_cfg or not cfg.eval_from_run:
        return cfg.eval
    composed = OmegaConf.create(OmegaConf.to_container(cfg.eval, resolve=True))
    settings = OmegaConf.create(OmegaConf.to_container(run_cfg.eval, resolve=True))
    overrides = user_overrides("eval")
    if any(o.key_or_group == "eval" for o in overrides):  # Hydra applies a group choice before key overrides
        settings = OmegaConf.merge(composed, settings)
    for override in overrides:
        if override.key_or_group != "eval":
            apply_override(settings, override.key_or_group.removeprefix("eval."), override)
    return settings


def evaluate_target(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl

    from tunelab.eval.evaluator import evaluate
    from tunelab.eval.report import comparison, print_comparison, write_reports
    from tunelab.eval.targets import resolve_target
    from tunelab.run import rundir
    from tunelab.run.assemble import build_datamodule, build_engine, build_evaluator, load_base, load_model, load_trained

    out_dir = Path(cfg.paths.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    build_engine(cfg)
    target = resolve_target(cfg.target)
    run_cfg = target.run_config if target else None
    data_cfg = run_cfg.data if (run_cfg is not None and cfg.data_from_run and "data" in run_cfg) else cfg.data
    if target is None:
        model, tokenizer = load_model(cfg)
        label = "model"
    else:
        model, tokenizer = load_trained(run_cfg, target.model_path)  # as its method reads it
        label = target.label
    # A run's data is tokenised and scored the way its method trained (e.g. train_on_prompt, preference pairs).
    method_cfg = run_cfg if run_cfg is not None and "method" in run_cfg else cfg
    datamodule = build_datamodule(method_cfg, tokenizer, stage="test", data_cfg=data_cfg)
    if target is not None:  # the fidelity gate: the run's own tokenizer and template, or a clear refusal
        from tunelab.run.provenance import gate_target

        template = getattr(getattr(datamodule, "formatter", None), "template", "chat")
        gate_target(target.model_path, tokenizer, template, cfg.allow_template_mismatch)
    with open_dict(cfg):
        cfg.eval = eval_config(cfg, run_cfg)  # recorded in resolved_config.yaml as it ran
        chosen = any(o.key_or_group == "eval" for o in user_overrides("eval"))  # eval=default on a DPO run: text metrics
        if run_cfg is not None and "method" in run_cfg and run_cfg.method.get("evaluator") and not chosen:
            cfg.method_evaluator = run_cfg.method.evaluator  # the method's own metrics (DPO, reward, ...)
    evaluator = build_evaluator(OmegaConf.create({"eval": cfg.eval, "method": {"evaluator": cfg.get("method_evaluator")}},
                                                 parent=cfg))
    OmegaConf.save(cfg, out_dir / "resolved_config.yaml", resolve=True)

    results = {}
    few_shot = int(getattr(evaluator, "few_shot", {}).get("k", 0))
    if label == "tuned" and evaluator.compare_base and cfg.base_from_run:
        base_model, _ = load_base(run_cfg if run_cfg is not None and "model" in run_cfg else cfg)
        results["base"] = evaluate(evaluator, "base", base_model, datamodule, out_dir)
        if few_shot:
            results["few_shot"] = evaluate(evaluator, "few_shot", base_model, datamodule, out_dir)
        del base_model
    results[label] = evaluate(evaluator, label, model, datamodule, out_dir)
    if label == "model" and few_shot:  # any model: its own zero- then few-shot
        results["few_shot"] = evaluate(evaluator, "few_shot", model, datamodule, out_dir)

    title = f"{cfg.target or cfg.model.get('name_or_path', 'model')} on {evaluator.split}"
    sections = write_reports(out_dir, results, evaluator, title, extra={"target": str(cfg.target)})
    metrics = {name: r.metrics for name, r in results.items()} | sections
    metrics |= {"target": str(cfg.target), "split": evaluator.split}
    pair = compared_pair(results, label)
    if pair:
        reference, candidate = (results[name].metrics for name in pair)
        metrics["delta"] = comparison(reference, candidate)
        few_shot = results["few_shot"].metrics if "base" in results and "few_shot" in results else None
        print_comparison(reference, candidate, title, few_shot, labels=tuple(COLUMNS[name] for name in pair))
    else:
        print_comparison({}, results[label].metrics, title=title, labels=("base", COLUMNS[label]))
    rundir.write_json_atomic(out_dir / rundir.METRICS, metrics)
    log.info("report: %s", out_dir / "report.md")
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def hydra_entry(cfg: DictConfig) -> None:
    from tunelab.run import lock

    try:
        with lock.holding(cfg.paths.run_dir):  # one run per dir (held already when named on the command line)
            evaluate_target(cfg)
    except TunelabError as err:
        die(str(err), err.exit_code)


def main() -> None:
    from tunelab.run import lock

    quiet_libraries()
    with ExitStack() as held:
        try:
            run_dir = named_run_dir(sys.argv[1:])
            lock.refuse_if_in_use(run_dir)
            preflight(sys.argv[1:], "evaluate")
            held.enter_context(lock.holding(run_dir))  # before Hydra writes into the dir
        except TunelabError as err:
            die(str(err), err.exit_code)
        hydra_entry()


if __name__ == "__main__":
    main()
