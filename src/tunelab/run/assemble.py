"""The one place a composed config becomes objects: model, tokenizer, datamodule, LightningModule,
evaluator, generation engine and Trainer. `tunelab-train`, `tunelab-verify`, `tunelab-evaluate`, `tunelab-data inspect`,
the benchmarks and the tests all build through here, so a tool that works for one method works for
every method, and what is saved is what ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.core.runtime import apply_runtime
from tunelab.config.derived import evaluator_config, without_headline
from tunelab.models.adapters import apply_adapter, build_adapter, count_parameters
from tunelab.models.qlora import QLoRA
from tunelab.platform.hardware import check_trainer, resolve_trainer
from tunelab.platform.threads import apply_threads


def finalize(cfg: DictConfig) -> DictConfig:
    """Make the config what will run, before anything is saved or built: the Trainer arguments the
    method pins merged over the trainer group (PPO steps its optimizer itself), then the concrete
    device, precision and CPU threads for `auto`."""
    pinned = cfg.method.get("trainer")
    if pinned:
        with open_dict(cfg):
            cfg.trainer = OmegaConf.merge(cfg.trainer, pinned)
    check_trainer(cfg.trainer)  # first: resolving precision for a GPU asks CUDA, which a CPU-only torch asserts on
    resolve_trainer(cfg)
    apply_threads(cfg)  # runtime.threads: cores / jobs at once, before anything computes
    return cfg


def load_model(cfg: DictConfig):
    """(model, tokenizer) of the model group."""
    return instantiate(cfg.model, _convert_="all")


def load_tokenizer(cfg: DictConfig):
    """The model group's tokenizer alone (inspecting data loads no network)."""
    from tunelab.models.loading import load_tokenizer as load

    return load(cfg.model.get("tokenizer") or cfg.model.get("name_or_path"))


def build_datamodule(cfg: DictConfig, tokenizer, stage: str = "fit", data_cfg: DictConfig | None = None):
    """The data group tokenised the way the method reads it; set up now, so data errors surface before
    anything slow."""
    tokenization = cfg.method.get("tokenization") if "method" in cfg else None
    datamodule = instantiate(data_cfg if data_cfg is not None else cfg.data, tokenizer=tokenizer, _convert_="all",
                             tokenization=instantiate(tokenization, _convert_="all") if tokenization else None)
    datamodule.setup(stage)
    return datamodule


def build_module(cfg: DictConfig, model, tokenizer):
    """The method's LightningModule around the adapted network: the method may reshape the network first
    (a reward head), the adapter decides what trains, the runtime group applies the speed knobs."""
    adapter, loraplus_lr_ratio = build_adapter(cfg.adapter)
    if isinstance(adapter, QLoRA):  # its compute dtype `auto` is the trainer's precision
        adapter = adapter.for_trainer(cfg.trainer)
    if cfg.method.get("prepare"):
        model, adapter = instantiate(cfg.method.prepare, _convert_="all")(model, tokenizer, adapter)
    model = apply_adapter(model, adapter)
    module = instantiate(cfg.method.module, model=model, optimizer=instantiate(cfg.optimizer),
                         scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True))
    module.loraplus_lr_ratio = loraplus_lr_ratio
    apply_runtime(module, cfg.get("runtime"))
    return module


def build_evaluator(cfg: DictConfig):
    return instantiate(without_headline(evaluator_config(cfg)), _convert_="all")


def build_engine(cfg: DictConfig):
    """The generation engine every sampler of this run uses (the `generation` group: hf | vllm)."""
    from tunelab.core.generation import configure

    return configure(cfg.get("generation"))


def build_trainer(cfg: DictConfig, **arguments):
    """A Lightning Trainer from the (finalized) trainer group; `arguments` are what the caller wires in."""
    return instantiate(cfg.trainer, _convert_="all", **arguments)


@dataclass
class Parts:
    model: object
    tokenizer: object
    datamodule: object
    module: object
    params: dict


def assemble(cfg: DictConfig) -> Parts:
    """Everything training needs, from a finalized config (see `finalize`)."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True)
    build_engine(cfg)
    model, tokenizer = load_model(cfg)
    datamodule = build_datamodule(cfg, tokenizer)
    module = build_module(cfg, model, tokenizer)
    # the network as it trains: adapter=qlora trains a 4-bit copy, and the full-precision model loaded here
    # must not stay referenced (for LoRA and full fine-tuning it is the same object)
    return Parts(module.model, tokenizer, datamodule, module, count_parameters(module.model))


def load_base(cfg: DictConfig):
    """(model, tokenizer) as training starts from it, before any adapter: the model group, reshaped by the
    method when it needs another head (a reward model's untrained score)."""
    model, tokenizer = load_model(cfg)
    method = cfg.get("method")
    if method is not None and method.get("prepare"):
        model, _ = instantiate(method.prepare, _convert_="all")(model, tokenizer, None)
    return model, tokenizer


def load_trained(cfg: DictConfig | None, model_path: str):
    """(model, tokenizer) of an exported model as its method reads it: the method's own loader (a reward
    run's sequence classifier), a sentence-transformers folder as one (contrastive), else a causal LM."""
    from pathlib import Path

    from tunelab.models.loading import load_pretrained
    from tunelab.models.sentence import load_sentence_transformer

    method = cfg.get("method") if cfg is not None else None
    if method is not None and method.get("load"):
        return instantiate(method.load, _convert_="all")(model_path)
    if (Path(model_path) / "modules.json").is_file():
        model_cfg = (cfg.get("model") if cfg is not None else None) or {}
        return load_sentence_transformer(model_path, max_seq_length=model_cfg.get("max_seq_length"))
    return load_pretrained(model_path)
