"""Every group composes; overrides use the spellings users know; the CLI prints the config."""

import subprocess
import sys

import pytest
from peft import LoraConfig

from tests.helpers import make_cfg
from tunelab.models import FullFineTuning
from tunelab.models.adapters import build_adapter

METHODS = ["sft", "pretrain", "dpo", "kto", "orpo", "simpo", "cpo"]
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


@pytest.mark.parametrize("method, datamodule", [
    ("sft", "tunelab.data.DataModule"), ("pretrain", "tunelab.data.DataModule"),
    ("dpo", "tunelab.data.preference.PreferenceDataModule"), ("reward", "tunelab.data.preference.PreferenceDataModule"),
    ("ppo", "tunelab.data.preference.PreferenceDataModule"), ("contrastive", "tunelab.data.pairs.PairsDataModule"),
    ("grpo", "tunelab.data.preference.PreferenceDataModule"), ("rloo", "tunelab.data.preference.PreferenceDataModule"),
    ("kto", "tunelab.data.preference.PreferenceDataModule"), ("orpo", "tunelab.data.preference.PreferenceDataModule"),
    ("simpo", "tunelab.data.preference.PreferenceDataModule"), ("cpo", "tunelab.data.preference.PreferenceDataModule"),
])
def test_data_custom_takes_the_methods_kind_of_data(tmp_path, method, datamodule):
    cfg = make_cfg(tmp_path, f"method={method}", "data=custom", "data.source=mine.jsonl")
    assert (cfg.data._target_, cfg.data.source) == (datamodule, "mine.jsonl")


def test_every_method_says_which_kind_of_data_data_custom_is():
    from tunelab.paths import CONF_DIR

    methods = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    assert methods - {p.stem for p in (CONF_DIR / "data" / "custom_for").glob("*.yaml")} == set()


def test_data_custom_composes_without_a_method_group(tmp_path):
    """tunelab-evaluate has no method: data=custom is then sft's kind (what generation is scored on)."""
    cfg = make_cfg(tmp_path, "data=custom", "data.source=mine.jsonl", fast=False, config="evaluate")
    assert cfg.data._target_ == "tunelab.data.DataModule"
