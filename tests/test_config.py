"""Every group composes; overrides use the spellings users know; the CLI prints the config."""

import subprocess
import sys

import pytest
from peft import LoraConfig

from tests.helpers import METHODS, make_cfg
from tunelab.models import FullFineTuning
from tunelab.models.adapters import build_adapter

ADAPTERS = ["full", "lora"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_method_and_adapter_composes(tmp_path, method, adapter):
    cfg = make_cfg(tmp_path, f"method={method}", f"adapter={adapter}")
    assert cfg.method.name == method
    built, _ = build_adapter(cfg.adapter)
    assert isinstance(built, LoraConfig if adapter == "lora" else FullFineTuning)


def test_peft_option_names_pass_through(tmp_path):
    cfg = make_cfg(tmp_path, "adapter=lora", "adapter.r=16", "adapter.target_modules=all-linear",
                   "adapter.lora_alpha=32")
    lora, _ = build_adapter(cfg.adapter)
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (16, 32, "all-linear")
    listed, _ = build_adapter(make_cfg(tmp_path, "adapter.target_modules=[q_proj,v_proj]").adapter)
    assert set(listed.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("data", ["facts", "facts_preferences"])
def test_data_dict_options_take_the_documented_override_form(tmp_path, data):
    """`data.fields={...}` and `data.filter={...}` as the README writes them (no `+` needed)."""
    cfg = make_cfg(tmp_path, f"data={data}", "data.fields={prompt:question,completion:answer}",
                   "data.filter={prompt:'capital|symbol'}")
    assert dict(cfg.data.fields) == {"prompt": "question", "completion": "answer"}
    assert dict(cfg.data.filter) == {"prompt": "capital|symbol"}


def test_adapter_sets_its_own_default_learning_rate(tmp_path):
    assert make_cfg(tmp_path, "adapter=full").optimizer.lr < make_cfg(tmp_path, "adapter=lora").optimizer.lr
    assert make_cfg(tmp_path, "adapter=full", "optimizer.lr=0.123").optimizer.lr == 0.123


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp", "deepspeed"])
def test_trainer_groups_compose(tmp_path, trainer):
    cfg = make_cfg(tmp_path, f"trainer={trainer}", fast=False)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.trainer.use_distributed_sampler is False


@pytest.mark.parametrize("logger", ["wandb", "csv", "tensorboard", "mlflow", "none"])
def test_logger_groups_compose_and_csv_rides_along(tmp_path, logger):
    cfg = make_cfg(tmp_path, f"logger={logger}")
    names = set(cfg.logger or {})
    assert (logger in names) or logger == "none"
    if logger != "none":
        assert "csv" in names


def test_cfg_job_prints_the_composed_config():
    out = subprocess.run([sys.executable, "-m", "tunelab.cli.train", "--cfg", "job", "adapter.r=12"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "r: 12" in out.stdout and "_target_: peft.LoraConfig" in out.stdout


def test_every_checked_value_names_a_key_of_the_composed_config(tmp_path):
    """The preflight check table (tunelab.config.checks) skips keys a config lacks, so a misspelt row would
    silently check nothing: every row must name a key of the default (LoRA) composition."""
    from omegaconf import OmegaConf

    from tunelab.config.checks import CHECKS

    cfg = make_cfg(tmp_path, "adapter=lora")
    missing = [c.key for c in CHECKS if OmegaConf.select(cfg, c.key, default="absent") == "absent"]
    assert not missing


@pytest.mark.parametrize("method", METHODS)
def test_data_custom_takes_the_methods_kind_of_data(tmp_path, method):
    """data=custom reads your file with the reader of the method's data kind: the one its own default data uses."""
    default = make_cfg(tmp_path, f"method={method}")
    cfg = make_cfg(tmp_path, f"method={method}", "data=custom", "data.source=mine.jsonl")
    assert (cfg.data._target_, cfg.data.source) == (default.data._target_, "mine.jsonl")
    assert (cfg.data.max_length, cfg.data.batch_size) == (default.data.max_length, default.data.batch_size)


def test_every_data_kind_has_a_reader_and_every_method_a_kind():
    """A method names its kind in its own config; conf/data/kind/ holds one reader per kind (no list per method)."""
    from omegaconf import OmegaConf

    from tunelab.paths import CONF_DIR

    kinds = {p.stem for p in (CONF_DIR / "data_kind").glob("*.yaml")}
    assert kinds == {p.stem for p in (CONF_DIR / "data" / "kind").glob("*.yaml")}
    for method in METHODS:
        chain, named = [method], None
        while named is None:  # rloo and simpo take their kind from the config they extend
            defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{chain[-1]}.yaml")).get("defaults", [])
            named = next((d["override /data_kind"] for d in defaults if isinstance(d, dict) and "override /data_kind" in d), None)
            if named is None:
                chain.append(next(d for d in defaults if isinstance(d, str) and d != "_self_"))
        assert named in kinds, (method, named)


def test_no_method_config_writes_outside_method(tmp_path):
    """Groups stay in their lane: a method's config sets only `method.*` (and picks defaults of other groups)."""
    from omegaconf import OmegaConf

    from tunelab.paths import CONF_DIR

    for method in METHODS:
        content = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
        assert set(content) - {"defaults"} == {"method"}, method


@pytest.mark.parametrize("method", METHODS)
def test_optimized_metric_is_the_headline_of_the_evaluator_that_runs(tmp_path, method):
    from tunelab.config.derived import evaluator_config

    cfg = make_cfg(tmp_path, f"method={method}")
    assert cfg.optimized_metric == f"tuned/{evaluator_config(cfg).headline}"
    assert make_cfg(tmp_path, f"method={method}", "eval=verifiable").optimized_metric == "tuned/test/reward"
    assert make_cfg(tmp_path, f"method={method}", "optimized_metric=tuned/test/x").optimized_metric == "tuned/test/x"


def test_data_custom_composes_without_a_method_group(tmp_path):
    """tunelab-evaluate has no method: data=custom is then sft's kind (what generation is scored on)."""
    cfg = make_cfg(tmp_path, "data=custom", "data.source=mine.jsonl", fast=False, config="evaluate")
    assert cfg.data._target_ == "tunelab.data.DataModule"
