"""Values derived from the composed config, so that no group writes into another: which evaluator runs, and
the metric a sweep optimises (its headline).

`optimized_metric: ${tunelab.optimized_metric:}` (conf/train.yaml) resolves through here: each evaluator node
declares its `headline`, the method's own evaluator (method.evaluator) or the eval group's, and the one that runs
names the metric.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

TEXT_EVALUATOR = "tunelab.eval.Evaluator"  # eval=default, judge, lm_eval: text metrics against references


def evaluator_config(cfg: DictConfig) -> DictConfig:
    """The eval group, except where it is the text evaluator and the method's output is not a text
    generator it can score (reward, DPO, contrastive, PPO, GRPO): that method brings its own. An eval group
    of another kind (eval=verifiable) scores every method's policy the same way, so it is used as chosen."""
    method = cfg.get("method")
    own = method.get("evaluator") if method is not None else None
    return own if own and cfg.eval.get("_target_") == TEXT_EVALUATOR else cfg.eval


def without_headline(node: DictConfig) -> DictConfig:
    """An evaluator node as its target takes it: `headline` is read by the config, not by the evaluator."""
    if "headline" not in node:
        return node
    values = OmegaConf.to_container(node, resolve=True)  # resolved first: it is read apart from its parents
    return OmegaConf.create({key: value for key, value in values.items() if key != "headline"})


def optimized_metric(_root_: DictConfig) -> str:
    headline = evaluator_config(_root_).get("headline")
    return f"tuned/{headline}" if headline else "tuned/test/loss"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("tunelab.optimized_metric", optimized_metric, replace=True)
